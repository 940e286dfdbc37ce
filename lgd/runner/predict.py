"""Running a trained student on image files (lgd-predict): a Predictor doing the model call on batches, the
inputs listed and checked before anything is read, and each image drawn by detectron2's Visualizer with the
dataset's metadata, plus one predictions.json in COCO's results format.

As detectron2's DefaultPredictor, the Predictor applies the config's test-time resizing and returns Instances in
the input image's pixels; unlike it, it takes a batch of images and runs on the run's configured device."""
import glob
import json
import logging
import os
import sys
from typing import Dict, List, Sequence

import numpy as np
import torch
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.data import transforms as T
from detectron2.data.detection_utils import convert_image_to_rgb, read_image
from detectron2.utils.visualizer import Visualizer
from tqdm import tqdm

from ..engine.checkpoint import AtomicCheckpointer, atomic_write
from ..errors import CommandError, UsageError
from ..methods import build_method
from .build import build_model

__all__ = ["PREDICTIONS_FILE", "Predictor", "coco_results", "dataset_metadata", "draw_predictions", "list_inputs",
           "output_names", "predict_files", "config_test_dataset"]

logger = logging.getLogger(__name__)
PREDICTIONS_FILE = "predictions.json"


class Predictor:
    """The student detector of `checkpoint` (a run's full checkpoint or lgd-export's student file), loaded with
    lgd-eval's check (a checkpoint that does not fit the config is a CheckpointError naming the file), in eval
    mode on the run's device. predictor(images) takes images in the config's input format (HWC uint8 arrays,
    cfg.dataloader.test.mapper.image_format) and returns one Instances (CPU, image pixels) per image."""

    def __init__(self, cfg, checkpoint: str):
        self.model = build_model(cfg, build_method(cfg, "baseline")).eval()
        AtomicCheckpointer(self.model).load_checked(checkpoint)
        mapper = cfg.dataloader.test.mapper
        self.input_format = str(mapper.get("image_format", None) or cfg.model.get("input_format", "BGR"))
        self.augmentations = T.AugmentationList(instantiate(list(mapper.get("augmentations", []))))

    def __call__(self, images: Sequence[np.ndarray]) -> List:
        inputs = []
        for image in images:
            aug = T.AugInput(image)
            self.augmentations(aug)
            tensor = torch.as_tensor(np.ascontiguousarray(aug.image.transpose(2, 0, 1)))
            inputs.append({"image": tensor, "height": image.shape[0], "width": image.shape[1]})
        with torch.no_grad():
            return [out["instances"].to("cpu") for out in self.model(inputs)]


def config_test_dataset(cfg) -> str:
    """The config's (first) test dataset name, "" when it names none."""
    names = cfg.dataloader.test.dataset.get("names", None)
    return names if isinstance(names, str) else str((list(names or []) or [""])[0])


def dataset_metadata(cfg):
    """The MetadataCatalog entry of the config's test dataset, with its class names: a COCO json registered by
    path gets them when its dicts are first loaded, so they are loaded here if missing."""
    name = config_test_dataset(cfg)
    if name in DatasetCatalog.list() and not MetadataCatalog.get(name).get("thing_classes", None):
        DatasetCatalog.get(name)
    metadata = MetadataCatalog.get(name) if name else Metadata()
    if not metadata.get("thing_classes", None):
        logger.warning("dataset %r of the config is not registered (or has no class names): classes are drawn "
                       "as numbers; register it with --dataset NAME=ann.json:images/", name)
    return metadata


def list_inputs(inputs: Sequence[str]) -> List[str]:
    """The files named by `inputs` (a file, a folder: its files, not hidden, sorted; or a glob), each once, in
    order; a UsageError names an input that matches nothing."""
    files = []
    for entry in inputs:
        if os.path.isdir(entry):
            found = sorted(os.path.join(entry, f) for f in os.listdir(entry) if not f.startswith("."))
            found = [f for f in found if os.path.isfile(f)]
        elif os.path.isfile(entry):
            found = [entry]
        else:
            found = sorted(f for f in glob.glob(entry) if os.path.isfile(f))
        if not found:
            raise UsageError(f"--input {entry}: no such file or folder, and no file matches it as a glob")
        files.extend(found)
    return list(dict.fromkeys(files))


def output_names(files: Sequence[str], output_dir: str, overwrite: bool) -> List[str]:
    """One PNG per input in output_dir (<stem>.png). A UsageError when two inputs would write the same file,
    or when one of them, or predictions.json, exists and not overwrite."""
    outputs = [os.path.join(output_dir, os.path.splitext(os.path.basename(f))[0] + ".png") for f in files]
    seen = {}
    for source, out in zip(files, outputs):
        if out in seen:
            raise UsageError(f"--input {seen[out]} and {source} would both be drawn to {out}",
                             hint="predict them into different --output folders")
        seen[out] = source
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UsageError(f"--output {output_dir} is a file; give a folder")
    existing = [p for p in outputs + [os.path.join(output_dir, PREDICTIONS_FILE)] if os.path.exists(p)]
    if existing and not overwrite:
        raise UsageError(f"--output {output_dir} holds {existing[0]}" + (f" and {len(existing) - 1} more files"
                         if len(existing) > 1 else "") + " of an earlier prediction: refusing to overwrite",
                         hint="pass --overwrite to replace them, or choose another --output")
    return outputs


def draw_predictions(image_rgb: np.ndarray, instances, metadata) -> np.ndarray:
    """The image (RGB) with `instances`' boxes, class names and scores drawn by detectron2's Visualizer."""
    return Visualizer(image_rgb, metadata).draw_instance_predictions(instances).get_image()


def coco_results(instances, image_id: int, file_name: str, metadata) -> List[Dict]:
    """COCO results-format rows of one image (bbox as x, y, w, h in its pixels), each with the file's name.
    category_id is the dataset's own id where the metadata maps it (as detectron2's COCOEvaluator writes it)."""
    to_dataset = {v: k for k, v in metadata.get("thing_dataset_id_to_contiguous_id", {}).items()}
    boxes = instances.pred_boxes.tensor.numpy().astype(float)
    rows = []
    for (x0, y0, x1, y1), cls, score in zip(boxes, instances.pred_classes.tolist(), instances.scores.tolist()):
        rows.append({"image_id": image_id, "file_name": file_name, "category_id": int(to_dataset.get(cls, cls)),
                     "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})
    return rows


def _read(path, input_format):
    """(the image in the model's format, in RGB) or the reason it cannot be read."""
    try:
        image = read_image(path, format=input_format)
    except Exception as exc:  # noqa: BLE001 - PIL's errors for a non-image or a corrupt one vary
        return f"not a readable image ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return image, convert_image_to_rgb(image, input_format)


def predict_files(predictor: Predictor, files: Sequence[str], outputs: Sequence[str], output_dir: str, metadata,
                  *, confidence_threshold: float = 0.5, batch_size: int = 4) -> Dict:
    """Predicts `files` in batches (a tqdm bar over two images or more), keeps the detections scoring at least
    confidence_threshold, draws each to its `outputs` PNG and writes output_dir/predictions.json (image_id: the
    file's 1-based position in `files`). A file that cannot be read is named on one line and skipped (a lone
input: a CommandError naming it). Returns
    {"images", "detections", "skipped": [(file, reason)], "predictions"}."""
    os.makedirs(output_dir, exist_ok=True)
    results, skipped, done = [], [], 0
    bar = tqdm(total=len(files), desc="lgd-predict", unit="image", dynamic_ncols=True, disable=len(files) == 1)
    for start in range(0, len(files), batch_size):
        batch = []
        for index in range(start, min(start + batch_size, len(files))):
            read = _read(files[index], predictor.input_format)
            if isinstance(read, str) and len(files) == 1:
                raise CommandError(f"--input {files[index]}: {read}")
            if isinstance(read, str):
                skipped.append((files[index], read))
                bar.write(f"skipped {files[index]}: {read}", file=sys.stderr)
                bar.update(1)
            else:
                batch.append((index, read))
        predictions = predictor([image for _, (image, _) in batch]) if batch else []
        for (index, (_, rgb)), instances in zip(batch, predictions):
            instances = instances[instances.scores >= confidence_threshold]
            drawn = draw_predictions(rgb, instances, metadata)
            atomic_write(outputs[index], lambda f: _save_png(drawn, f))
            results.extend(coco_results(instances, index + 1, files[index], metadata))
            done += 1
            bar.update(1)
    bar.close()
    if not done:
        raise CommandError(f"none of the {len(files)} inputs could be read as an image (each is named above)")
    path = os.path.join(output_dir, PREDICTIONS_FILE)
    atomic_write(path, lambda f: f.write(json.dumps(results, indent=1).encode()))
    return {"images": done, "detections": len(results), "skipped": skipped, "predictions": path}


def _save_png(image, f):
    from PIL import Image

    Image.fromarray(image).save(f, format="PNG")
