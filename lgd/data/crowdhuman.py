"""CrowdHuman (.odgt annotations) as detectron2 datasets: full-body person boxes plus ignore regions.

Why ignore regions matter: CrowdHuman marks crowds, reflections and statues as "mask" boxes that a detector must
neither be trained on nor penalized for; they are kept as iscrowd annotations, which detectron2's mapper drops
from training and COCOEvaluator and lgd.evaluation.MissRateEvaluator treat as ignore regions.
"""
import json

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image
from tqdm import tqdm

from .register import existing_path, is_registered_as

CROWDHUMAN_CLASSES = ["person"]


def _annotation(gtbox, where):
    if "fbox" not in gtbox or "tag" not in gtbox:
        raise ValueError(f"{where}: a gtbox without 'tag' or 'fbox': {gtbox}")
    x, y, w, h = (float(v) for v in gtbox["fbox"])
    if w <= 0 or h <= 0:
        return None
    ignore = gtbox["tag"] != "person" or bool(gtbox.get("extra", {}).get("ignore", 0))
    return {"bbox": [x, y, w, h], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0, "iscrowd": int(ignore)}


def load_crowdhuman_odgt(odgt_file, image_root):
    """Read a CrowdHuman .odgt file into detectron2 dataset dicts.

    An .odgt file has one JSON object per line: ``{"ID": "...", "gtboxes": [{"tag": "person" | "mask",
    "fbox": [x, y, w, h] (full body), "vbox": ..., "hbox": ..., "extra": {"ignore": 0 | 1, ...}}, ...]}``; the image
    is ``<image_root>/<ID>.jpg``. Each record holds one annotation per gtbox with the full-body box (XYWH_ABS, as
    written: it may extend past the image; detectron2's mapper clips it) and category 0 ("person"): a "person" box
    with ``extra.ignore`` 0 is a normal annotation (iscrowd 0); a "mask" box or one with ``extra.ignore`` 1 is an
    ignore region (iscrowd 1), so an image with only ignore regions counts as empty in training. Boxes with no
    area are skipped; height and width are read from the image headers."""
    odgt_file = existing_path(odgt_file, "file", "odgt_file")
    image_root = existing_path(image_root, "directory", "image_root")
    lines = [line for line in odgt_file.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(tqdm(lines, desc=f"reading {odgt_file.name}", unit="image"), start=1):
        where = f"{odgt_file}:{number}"
        try:
            entry = json.loads(line)
            image_id = entry["ID"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{where}: not a CrowdHuman odgt line (JSON with an 'ID'): {e}") from e
        file_name = image_root / f"{image_id}.jpg"
        with Image.open(file_name) as im:  # reads the header only
            width, height = im.size
        annotations = [_annotation(box, where) for box in entry.get("gtboxes", [])]
        records.append({"file_name": str(file_name), "image_id": image_id, "height": height, "width": width,
                        "annotations": [a for a in annotations if a is not None]})
    return records


def register_crowdhuman(name, odgt_file, image_root):
    """Register a CrowdHuman split under ``name`` (idempotent); its metadata says evaluator_type "mmr", i.e.
    evaluate it with lgd.evaluation.MissRateEvaluator(name)."""
    odgt_file = str(existing_path(odgt_file, "file", "odgt_file"))
    image_root = str(existing_path(image_root, "directory", "image_root"))
    if not is_registered_as(name, odgt_file=odgt_file, image_root=image_root):
        DatasetCatalog.register(name, lambda: load_crowdhuman_odgt(odgt_file, image_root))
        MetadataCatalog.get(name).set(thing_classes=list(CROWDHUMAN_CLASSES), odgt_file=odgt_file,
                                      image_root=image_root, evaluator_type="mmr")
    return name
