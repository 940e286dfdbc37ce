"""Log-average miss rate (mMR), the CrowdHuman / Caltech pedestrian metric, as a detectron2 DatasetEvaluator.

Why our own: detectron2 has no mMR, and CrowdHuman results are reported in it (lower is better). The protocol,
Caltech's dbEval / CrowdHuman's eval_MR rule in the "full" setup, is written out in MissRateEvaluator.
"""
import itertools
import logging
import math

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import Boxes, BoxMode, pairwise_ioa, pairwise_iou
from detectron2.utils import comm

logger = logging.getLogger(__name__)

REFERENCE_FPPI = np.logspace(-2, 0, 9)
MIN_MISS_RATE = 1e-10


def _as_boxes(array):
    return Boxes(torch.as_tensor(np.asarray(array, dtype=np.float64).reshape(-1, 4)))


def match_image(det_boxes, det_scores, gt_boxes, ignore_boxes, iou_threshold=0.5, ioa_threshold=0.5):
    """Greedy matching of one image (MissRateEvaluator's step 1). Boxes are XYXY arrays [N, 4].

    Returns (scores, is_tp) of the detections that count (true or false positives), ignored ones left out.
    """
    det_scores = np.asarray(det_scores, dtype=np.float64).reshape(-1)
    dets, gts, ignores = _as_boxes(det_boxes), _as_boxes(gt_boxes), _as_boxes(ignore_boxes)
    if len(dets) != len(det_scores):
        raise ValueError(f"det_scores must have one score per box: {len(det_scores)} scores, {len(dets)} boxes")
    iou = pairwise_iou(dets, gts).numpy()           # [D, G]
    ioa = pairwise_ioa(ignores, dets).numpy().T     # [D, I]: intersection / detection area
    matched = np.zeros(len(gts), dtype=bool)
    kept_scores, is_tp = [], []
    for d in np.argsort(-det_scores, kind="stable"):
        candidates = np.where(matched, -1.0, iou[d])
        best = int(candidates.argmax()) if len(gts) else -1
        if best >= 0 and candidates[best] >= iou_threshold:
            matched[best] = True
            kept_scores.append(det_scores[d])
            is_tp.append(True)
        elif not (ioa.shape[1] and ioa[d].max() >= ioa_threshold):
            kept_scores.append(det_scores[d])
            is_tp.append(False)
    return np.asarray(kept_scores, dtype=np.float64), np.asarray(is_tp, dtype=bool)


def log_average_miss_rate(scores, is_tp, num_gt, num_images, reference_fppi=REFERENCE_FPPI):
    """mMR from the kept detections of all images (MissRateEvaluator's steps 2-3).
    Returns (mmr, miss rates at reference_fppi)."""
    if num_gt <= 0:
        raise ValueError(f"num_gt must be positive (miss rate is undefined without ground truth), got {num_gt}")
    if num_images <= 0:
        raise ValueError(f"num_images must be positive, got {num_images}")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    tp = np.asarray(is_tp, dtype=bool)[order]
    miss_rate = np.concatenate([[1.0], 1.0 - np.cumsum(tp) / num_gt])
    fppi = np.concatenate([[0.0], np.cumsum(~tp) / num_images])
    at_ref = miss_rate[np.searchsorted(fppi, reference_fppi, side="right") - 1]
    return float(np.exp(np.mean(np.log(np.maximum(at_ref, MIN_MISS_RATE))))), at_ref


def _ground_truth(record, category_id):
    """(boxes, ignore regions) of ``category_id`` in a dataset dict, XYXY, clipped to the image when its size is
    known (as CrowdHuman's evaluation does: a full-body box may extend past the image, predictions cannot)."""
    annotations = [a for a in record.get("annotations", []) if a["category_id"] == category_id]
    result = []
    for crowd in (False, True):
        boxes = _as_boxes([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                           for a in annotations if bool(a.get("iscrowd", 0)) == crowd])
        if "height" in record and "width" in record:
            boxes.clip((record["height"], record["width"]))
        result.append(boxes.tensor.numpy())
    return tuple(result)


class MissRateEvaluator(DatasetEvaluator):
    """mMR of a detector's ``instances`` on a registered dataset (ground truth and ignore regions from its dicts).

    ``category_id``: the contiguous class evaluated (ground truth and predictions of other classes are left
    out). Only images passed to process() count, in FPPI and in #gt. Protocol ("full" setup: every box, no height
    or visibility filter):
    1. Per image (ground-truth boxes and ignore regions clipped to the image, like the predictions), detections
       in decreasing score order are matched greedily: a detection takes the not yet matched ground-truth box
       with the highest IoU if that IoU >= 0.5 (true positive). Otherwise, if it covers an ignore region (iscrowd
       1, e.g. CrowdHuman "mask" or extra.ignore boxes) with IoA = intersection / detection area >= 0.5, it is
       dropped (neither true nor false positive); else it is a false positive.
    2. All images' kept detections are sorted by score; after the k-th, miss rate MR_k = 1 - TP_k / #gt and false
       positives per image FPPI_k = FP_k / #images. Before the first detection MR = 1, FPPI = 0.
    3. At each of the 9 reference FPPIs log-spaced in [1e-2, 1], the miss rate is that of the lowest score
       threshold whose FPPI does not exceed the reference (the curve point reached at that FPPI).
       mMR = exp(mean(log(max(MR_ref, 1e-10)))).
    So no detections give mMR 1 and a perfect detector gives 1e-10 ~ 0. Reported in percent, like the papers:
    {"mMR": {"mMR": ..., "num_images": ..., "num_gt": ...}}.
    """

    def __init__(self, dataset_name, category_id=0, iou_threshold=0.5, ioa_threshold=0.5, distributed=True):
        self._category_id = category_id
        self._thresholds = (iou_threshold, ioa_threshold)
        self._distributed = distributed
        self._ground_truth = {}
        for record in DatasetCatalog.get(dataset_name):
            self._ground_truth[record["image_id"]] = _ground_truth(record, category_id)
        self._results = []

    def reset(self):
        self._results = []

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            if inp["image_id"] not in self._ground_truth:
                raise ValueError(f"inputs: image_id {inp['image_id']!r} is not in the evaluated dataset")
            instances = out["instances"].to("cpu")
            keep = instances.pred_classes == self._category_id
            gt, ignore = self._ground_truth[inp["image_id"]]
            scores, is_tp = match_image(instances.pred_boxes.tensor[keep].numpy(), instances.scores[keep].numpy(),
                                        gt, ignore, *self._thresholds)
            self._results.append((scores, is_tp, len(gt)))

    def evaluate(self):
        results = self._results
        if self._distributed:
            comm.synchronize()
            results = list(itertools.chain(*comm.gather(results, dst=0)))
            if not comm.is_main_process():
                return {}
        num_gt = sum(r[2] for r in results)
        if not results or num_gt == 0:
            logger.warning("MissRateEvaluator: no image with ground truth was processed; mMR is undefined")
            return {"mMR": {"mMR": math.nan, "num_images": len(results), "num_gt": num_gt}}
        scores = np.concatenate([r[0] for r in results])
        is_tp = np.concatenate([r[1] for r in results])
        mmr, _ = log_average_miss_rate(scores, is_tp, num_gt, len(results))
        return {"mMR": {"mMR": 100.0 * mmr, "num_images": len(results), "num_gt": num_gt}}
