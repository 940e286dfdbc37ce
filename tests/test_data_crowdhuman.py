"""CrowdHuman .odgt loading and the log-average miss rate (mMR), checked against a hand-computed fixture.

tests/fixtures/crowdhuman/mini.odgt, full-body boxes as XYXY:
    img1: persons G1 (0,0,10,10), G2 (20,0,30,10); "mask" region R (50,0,70,20)
    img2: persons G3 (0,0,20,20), G4 (40,40,60,60); person with extra.ignore=1 P (80,10,95,50);
          a person with a 0-wide fbox (skipped)
    img3: no box
Detections (score, image, XYXY box) and their fate, in score order:
    f .95 img2 (0,0,20,10)     IoU with G3 = 200/400 = 0.5         -> TP
    c .90 img1 (100,100,110,110)  overlaps nothing                 -> FP
    a .80 img1 (0,0,10,10)     IoU with G1 = 1                     -> TP
    b .75 img1 (52,2,60,10)    no gt; IoA with R = 64/64 = 1       -> ignored
    d .60 img1 (0,0,10,10)     G1 already taken, IoU with G2 = 0   -> FP
    e .55 img1 (20,0,30,11)    IoU with G2 = 100/110 = 0.91        -> TP
    g .50 img2 (45,45,65,65)   IoU with G4 = 225/575 = 0.39        -> FP
    i .45 img1 (60,0,80,20)    IoA with R = 200/400 = 0.5          -> ignored
    h .40 img2 (82,20,92,40)   inside P                            -> ignored
4 ground-truth boxes, 3 images. Kept detections give (TP, FP) -> (MR, FPPI):
    start (0,0) -> (1, 0); f (1,0) -> (.75, 0); c (1,1) -> (.75, 1/3); a (2,1) -> (.5, 1/3);
    d (2,2) -> (.5, 2/3); e (3,2) -> (.25, 2/3); g (3,3) -> (.25, 1)
Reference FPPIs 10^(-2 + k/4), k = 0..8: 0.01 .. 0.316 (7 points) reach only FPPI 0 -> MR .75 (after f);
0.562 -> last point with FPPI <= 0.562 is after a -> .5; 1.0 -> after g -> .25.
mMR = exp((7 ln .75 + ln .5 + ln .25) / 9) = exp((7 * -0.287682 - 0.693147 - 1.386294) / 9)
    = exp(-4.093216 / 9) = exp(-0.454802) = 0.634574
"""
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("detectron2")

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances
from PIL import Image

from lgd.data.crowdhuman import load_crowdhuman_odgt, register_crowdhuman
from lgd.evaluation import MissRateEvaluator, log_average_miss_rate, match_image

ODGT = Path(__file__).parent / "fixtures" / "crowdhuman" / "mini.odgt"
HAND_MMR = 0.634574
DETECTIONS = {  # image -> [(score, box)]
    "img1": [(.90, (100, 100, 110, 110)), (.80, (0, 0, 10, 10)), (.75, (52, 2, 60, 10)), (.60, (0, 0, 10, 10)),
             (.55, (20, 0, 30, 11)), (.45, (60, 0, 80, 20))],
    "img2": [(.95, (0, 0, 20, 10)), (.50, (45, 45, 65, 65)), (.40, (82, 20, 92, 40))],
    "img3": [],
}
GT = {"img1": ([(0, 0, 10, 10), (20, 0, 30, 10)], [(50, 0, 70, 20)]),
      "img2": ([(0, 0, 20, 20), (40, 40, 60, 60)], [(80, 10, 95, 50)]),
      "img3": ([], [])}


@pytest.fixture
def image_root(tmp_path):
    for image_id in ("img1", "img2", "img3"):
        Image.new("RGB", (120, 80)).save(tmp_path / f"{image_id}.jpg")
    return tmp_path


def _match(image_id, ignore=True):
    dets = DETECTIONS[image_id]
    gt, ignores = GT[image_id]
    return match_image([b for _, b in dets], [s for s, _ in dets], gt, ignores if ignore else [])


def test_load_odgt(image_root):
    records = {r["image_id"]: r for r in load_crowdhuman_odgt(ODGT, image_root)}
    assert list(records) == ["img1", "img2", "img3"]
    for image_id, record in records.items():
        assert (record["height"], record["width"]) == (80, 120)
        assert record["file_name"] == str(image_root / f"{image_id}.jpg")
        annotations = record["annotations"]
        assert all(a["bbox_mode"] == BoxMode.XYWH_ABS and a["category_id"] == 0 for a in annotations)
        persons = [BoxMode.convert(a["bbox"], BoxMode.XYWH_ABS, BoxMode.XYXY_ABS) for a in annotations
                   if a["iscrowd"] == 0]
        ignores = [BoxMode.convert(a["bbox"], BoxMode.XYWH_ABS, BoxMode.XYXY_ABS) for a in annotations
                   if a["iscrowd"] == 1]
        assert (persons, ignores) == tuple([list(map(float, b)) for b in boxes] for boxes in GT[image_id])


def test_load_odgt_errors(tmp_path, image_root):
    with pytest.raises(FileNotFoundError, match="odgt_file"):
        load_crowdhuman_odgt(tmp_path / "nope.odgt", image_root)
    bad = tmp_path / "bad.odgt"
    bad.write_text('{"ID": "img1", "gtboxes": []}\n{"gtboxes": []}\n')
    with pytest.raises(ValueError, match="bad.odgt:2"):
        load_crowdhuman_odgt(bad, image_root)


def test_match_image_by_hand():
    scores, is_tp = _match("img1")
    assert scores.tolist() == [.90, .80, .60, .55] and is_tp.tolist() == [False, True, False, True]
    scores, is_tp = _match("img2")
    assert scores.tolist() == [.95, .50] and is_tp.tolist() == [True, False]
    scores, is_tp = _match("img1", ignore=False)  # without the mask region, b and i are false positives
    assert scores.tolist() == [.90, .80, .75, .60, .55, .45] and (~is_tp).sum() == 4
    scores, is_tp = _match("img3")
    assert scores.size == 0 and is_tp.size == 0


def test_log_average_miss_rate_by_hand():
    matched = [_match(image_id) for image_id in GT]
    scores = np.concatenate([m[0] for m in matched])
    is_tp = np.concatenate([m[1] for m in matched])
    mmr, at_ref = log_average_miss_rate(scores, is_tp, num_gt=4, num_images=3)
    np.testing.assert_allclose(at_ref, [.75] * 7 + [.5, .25])
    assert mmr == pytest.approx(HAND_MMR, abs=1e-6)
    assert mmr == pytest.approx(math.exp((7 * math.log(.75) + math.log(.5) + math.log(.25)) / 9))


def test_log_average_miss_rate_edge_cases():
    assert log_average_miss_rate([], [], num_gt=4, num_images=3)[0] == 1.0  # no detections
    mmr, at_ref = log_average_miss_rate([.9, .8, .7, .6], [True] * 4, num_gt=4, num_images=3)  # perfect
    assert mmr == pytest.approx(0.0, abs=1e-9) and not at_ref.any()
    # only false positives above every true positive: 4 FPs on 2 images reach FPPI 2 > 1 before any TP
    mmr, _ = log_average_miss_rate([.9, .9, .9, .9, .1], [False] * 4 + [True], num_gt=1, num_images=2)
    assert mmr == 1.0
    with pytest.raises(ValueError, match="num_gt"):
        log_average_miss_rate([], [], num_gt=0, num_images=3)
    with pytest.raises(ValueError, match="det_scores"):
        match_image([(0, 0, 1, 1)], [], [], [])


def _outputs(image_id):
    dets = DETECTIONS[image_id]
    instances = Instances((80, 120))
    instances.pred_boxes = Boxes(torch.tensor([b for _, b in dets], dtype=torch.float32).reshape(-1, 4))
    instances.scores = torch.tensor([s for s, _ in dets], dtype=torch.float32)
    instances.pred_classes = torch.zeros(len(dets), dtype=torch.int64)
    return {"instances": instances}


def test_evaluator_clips_ground_truth_to_the_image(tmp_path, image_root):
    """A full-body box past the image border (100,10)-(160,70) on a 120 px wide image matches the clipped
    prediction (100,10)-(120,70): IoU 1 after clipping (0.33 before)."""
    odgt = tmp_path / "edge.odgt"
    odgt.write_text('{"ID": "img1", "gtboxes": [{"tag": "person", "fbox": [100, 10, 60, 60], "extra": {}}]}\n')
    name = register_crowdhuman("lgd_test_crowdhuman_edge", odgt, image_root)
    try:
        evaluator = MissRateEvaluator(name, distributed=False)
        instances = Instances((80, 120), pred_boxes=Boxes(torch.tensor([[100.0, 10, 120, 70]])),
                              scores=torch.tensor([0.9]), pred_classes=torch.tensor([0]))
        evaluator.process([{"image_id": "img1"}], [{"instances": instances}])
        assert evaluator.evaluate()["mMR"]["mMR"] == pytest.approx(0.0, abs=1e-6)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_evaluator_on_registered_crowdhuman(image_root):
    name = register_crowdhuman("lgd_test_crowdhuman", ODGT, image_root)
    try:
        assert register_crowdhuman("lgd_test_crowdhuman", ODGT, image_root) == name  # idempotent
        assert MetadataCatalog.get(name).evaluator_type == "mmr"
        evaluator = MissRateEvaluator(name, distributed=False)
        evaluator.reset()
        for image_id in GT:
            evaluator.process([{"image_id": image_id}], [_outputs(image_id)])
        result = evaluator.evaluate()["mMR"]
        assert result["mMR"] == pytest.approx(100 * HAND_MMR, abs=1e-4)
        assert (result["num_images"], result["num_gt"]) == (3, 4)

        evaluator.reset()  # a detection of another class is left out
        other = Instances((80, 120), pred_boxes=Boxes(torch.tensor([[0.0, 0, 9, 9]])), scores=torch.tensor([1.0]),
                          pred_classes=torch.tensor([1]))
        evaluator.process([{"image_id": "img3"}], [{"instances": other}])
        assert math.isnan(evaluator.evaluate()["mMR"]["mMR"])  # img3 has no ground truth: undefined
        with pytest.raises(ValueError, match="image_id"):
            evaluator.process([{"image_id": "nope"}], [_outputs("img3")])
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
