"""Datasets by path in detectron2's catalogs (COCO-format json, Pascal VOC layout), registered idempotently, and
the checks every command runs on a dataset before it writes anything.

Why: a dataset given on the command line should fail early with a message naming the file and the entry, not deep
inside detectron2's loader or pycocotools; registering the same name twice with other files is an error rather
than detectron2's silent first-wins. Usage and the VOC layout: docs/library.md.
"""
import difflib
import json
import logging
import math
import os
import time
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.data.datasets.pascal_voc import CLASS_NAMES as VOC_CLASS_NAMES
from detectron2.data.datasets.pascal_voc import register_pascal_voc

_SPEC_FORMAT = "[NAME=]ANNOTATIONS.json:IMAGE_ROOT"
logger = logging.getLogger("lgd.data")


class DatasetError(ValueError):
    """An invalid or unusable dataset; the message names the file (and entry), `hint` says what to do."""

    def __init__(self, message, hint=None):
        super().__init__(message)
        self.hint = hint


def is_registered_as(name, **expected):
    """True if ``name`` is registered with metadata equal to ``expected``; ValueError if with other values."""
    if name not in DatasetCatalog.list():
        return False
    meta = MetadataCatalog.get(name)
    have = {key: meta.get(key, None) for key in expected}
    if have != expected:
        raise ValueError(f"dataset {name!r} is already registered with {have}, not {expected}; pick another name")
    return True


def existing_path(path, kind, argument):
    """``path`` resolved; FileNotFoundError naming ``argument`` unless it is an existing file/directory (``kind``)."""
    path = Path(path).expanduser().resolve()
    exists = path.is_file() if kind == "file" else path.is_dir()
    if not exists:
        raise FileNotFoundError(f"{argument}: {kind} not found: {path}")
    return path


def register_coco_once(name, json_file, image_root, metadata=None):
    """register_coco_instances, skipped when ``name`` already points at the same json and image root."""
    json_file = str(existing_path(json_file, "file", "json_file"))
    image_root = str(existing_path(image_root, "directory", "image_root"))
    if not is_registered_as(name, json_file=json_file, image_root=image_root):
        register_coco_instances(name, dict(metadata or {}), json_file, image_root)
    return name


def parse_coco_spec(spec):
    """Split ``"[NAME=]ann.json:images/"`` into (name, json_file, image_root); name defaults to the json's stem.

    The json path ends at the first ``.json:``, so the paths may contain ``=`` or ``:`` elsewhere.
    """
    if not isinstance(spec, str):
        raise ValueError(f"spec must be a string {_SPEC_FORMAT!r}, got {type(spec).__name__}")
    cut = spec.find(".json:")
    if cut < 0:
        raise ValueError(f"spec must look like {_SPEC_FORMAT!r} (a .json file, ':', an image folder), got {spec!r}")
    head, image_root = spec[: cut + len(".json")], spec[cut + len(".json:"):]
    name, sep, json_file = head.partition("=")
    if not sep or "/" in name or "\\" in name:  # no NAME= prefix: the '=' (if any) belongs to the path
        name, json_file = "", head
    name = name or Path(json_file).stem
    if not json_file[: -len(".json")] or not image_root:
        raise ValueError(f"spec must look like {_SPEC_FORMAT!r} with both paths non-empty, got {spec!r}")
    return name, json_file, image_root


def register_coco_by_path(spec, metadata=None):
    """Register the COCO-format dataset ``spec`` = ``"[NAME=]ann.json:images/"``; returns its name.

    Idempotent (same name and files: no-op). FileNotFoundError names a missing json or image folder.
    """
    name, json_file, image_root = parse_coco_spec(spec)
    return register_coco_once(name, json_file, image_root, metadata)


def register_voc_by_path(name, dirname, split, year=2007, class_names=VOC_CLASS_NAMES):
    """Register a Pascal VOC-layout folder (Annotations/, ImageSets/Main/<split>.txt, JPEGImages/) under ``name``
    with detectron2's register_pascal_voc (evaluator_type "pascal_voc"); idempotent. Returns ``name``.

    Note: detectron2 v0.6's loader fails on a split file listing a single image id (np.loadtxt gives a 0-d array).
    """
    dirname = existing_path(dirname, "directory", "dirname")
    existing_path(dirname / "ImageSets" / "Main" / f"{split}.txt", "file", "split")
    if year not in (2007, 2012):
        raise ValueError(f"year must be 2007 or 2012 (selects the VOC evaluation protocol), got {year!r}")
    if not is_registered_as(name, dirname=str(dirname), split=split, year=year):
        register_pascal_voc(name, str(dirname), split, year, list(class_names))
        MetadataCatalog.get(name).evaluator_type = "pascal_voc"  # as detectron2's builtin VOC splits have
    return name


def _first(items, n=3):
    items = [str(i) for i in items]
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _entries(data, key, where, required=True):
    if key not in data:
        if not required:
            return []
        raise DatasetError(f"{where}: no {key!r} list (a COCO json has 'images', 'annotations', 'categories')")
    entries = data[key]
    if not isinstance(entries, list):
        raise DatasetError(f"{where}: {key!r} must be a list, got {type(entries).__name__}")
    return entries


def _check_fields(entry, index, kind, fields, where):
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: {kind} #{index} must be an object, got {type(entry).__name__}")
    missing = [f for f in fields if f not in entry]
    if missing:
        label = f"{kind} id {entry['id']!r}" if "id" in entry else f"{kind} #{index}"
        raise DatasetError(f"{where}: {label} has no {', '.join(map(repr, missing))} (needs {', '.join(fields)})")


def _unique_ids(entries, kind, where):
    ids, seen = [], set()
    for entry in entries:
        key = entry["id"]
        if not isinstance(key, (int, str)) or isinstance(key, bool):
            raise DatasetError(f"{where}: {kind} id {key!r} must be an integer")
        if key in seen:
            raise DatasetError(f"{where}: {kind} id {key!r} appears twice ({kind} ids must be unique)")
        seen.add(key)
        ids.append(key)
    return seen


def validate_coco_json(json_file, image_root, *, training=False, evaluation=False, check_images=True):
    """Checks a COCO-format dataset before anything uses it; DatasetError names the file and the first offending
    entry. The json parses and is an object; `images` is a non-empty list of {id, file_name, width, height} with
    unique ids, every file existing under `image_root` (check_images); `categories` a non-empty list of {id, name}
    with unique ids; `annotations` a list of {id, image_id, category_id, bbox} with unique ids, known image and
    category ids and `bbox` four finite numbers [x, y, width, height]. training: needs at least one usable box;
    evaluation: needs `area` and `iscrowd` in every annotation (pycocotools does). Warns about (and counts) boxes
    with width or height <= 0, which training drops (drop_degenerate_boxes). Returns {"images", "annotations",
    "categories", "degenerate_boxes", "missing_images"} counts."""
    where = str(json_file)
    if not os.path.isfile(where):
        raise DatasetError(f"annotation file not found: {where}")
    if not os.path.isdir(str(image_root)):
        raise DatasetError(f"{where}: image folder not found: {image_root}")
    try:
        with open(where, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except (UnicodeDecodeError, OSError) as exc:
        raise DatasetError(f"{where}: cannot be read as JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{where}: expected a JSON object with 'images', 'annotations' and 'categories', "
                           f"got a {type(data).__name__}")
    images = _entries(data, "images", where)
    categories = _entries(data, "categories", where)
    annotations = _entries(data, "annotations", where, required=training or evaluation)
    if not images:
        raise DatasetError(f"{where}: 'images' is empty: the dataset has no images")
    if not categories:
        raise DatasetError(f"{where}: 'categories' is empty: the classifier is sized from the categories",
                           hint='list every class as {"id": 1, "name": "tree"}')
    for i, cat in enumerate(categories):
        _check_fields(cat, i, "category", ("id", "name"), where)
    category_ids = _unique_ids(categories, "category", where)
    for i, img in enumerate(images):
        _check_fields(img, i, "image", ("id", "file_name", "width", "height"), where)
        if not (isinstance(img["file_name"], str) and img["file_name"]):
            raise DatasetError(f"{where}: image id {img['id']!r}: 'file_name' must be a non-empty string")
        for side in ("width", "height"):
            if not (isinstance(img[side], int) and not isinstance(img[side], bool) and img[side] > 0):
                raise DatasetError(f"{where}: image id {img['id']!r}: {side!r} must be a positive integer, "
                                   f"got {img[side]!r}")
    image_ids = _unique_ids(images, "image", where)
    missing = []
    if check_images:
        missing = [img["file_name"] for img in images if not os.path.isfile(os.path.join(image_root, img["file_name"]))]
        if missing:
            raise DatasetError(f"{where}: {len(missing)} of {len(images)} image files not found under {image_root} "
                               f"(first: {_first(missing)})", hint="check the image folder given after the ':'")
        check_image_headers(images, image_root, where)
    fields = ("id", "image_id", "category_id", "bbox") + (("area", "iscrowd") if evaluation else ())
    degenerate, outside, usable = [], [], 0
    sizes = {img["id"]: (img["width"], img["height"]) for img in images}
    for i, ann in enumerate(annotations):
        _check_fields(ann, i, "annotation", fields, where)
        label = f"annotation id {ann['id']!r}"
        if ann["image_id"] not in image_ids:
            raise DatasetError(f"{where}: {label}: image_id {ann['image_id']!r} is not among the images' ids")
        if ann["category_id"] not in category_ids:
            raise DatasetError(f"{where}: {label}: category_id {ann['category_id']!r} is not among the "
                               f"categories' ids {_first(sorted(category_ids, key=str), 10)}")
        box = ann["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            raise DatasetError(f"{where}: {label}: 'bbox' must be 4 finite numbers [x, y, width, height], got {box!r}")
        if box[2] <= 0 or box[3] <= 0:
            degenerate.append(ann["id"])
        elif _outside(box[0], box[1], box[0] + box[2], box[1] + box[3], *sizes[ann["image_id"]]):
            outside.append(ann["id"])
        elif not ann.get("iscrowd", 0):
            usable += 1
    _unique_ids(annotations, "annotation", where)
    if degenerate:
        logger.warning("%s: %d of %d boxes have a width or height <= 0: training drops them, evaluation "
                       "(pycocotools) keeps them (annotation ids %s)", where, len(degenerate), len(annotations),
                       _first(degenerate))
    if outside:
        logger.warning("%s: %d of %d boxes lie entirely outside their image: training drops them (annotation ids "
                       "%s)", where, len(outside), len(annotations), _first(outside))
    if training and not usable:
        raise DatasetError(f"{where}: no usable box to train on ({len(annotations)} annotations, "
                           f"{len(degenerate)} with width or height <= 0, {len(outside)} outside their image)")
    return {"images": len(images), "annotations": len(annotations), "categories": len(categories),
            "degenerate_boxes": len(degenerate), "outside_boxes": len(outside), "missing_images": len(missing)}


_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height (detectron2 applies them when reading)
_PROGRESS_FROM = 2000  # image count from which the header check logs its progress


def check_image_headers(images, image_root, where):
    """Reads the header of each image of a COCO `images` list (no decoding): DatasetError naming the file and
    image id when it is empty, not an image PIL knows, or not of the json's width x height (after its EXIF
    orientation, as detectron2 reads it). Logs progress on large sets."""
    from PIL import Image

    started, step = time.perf_counter(), max(len(images) // 10, 1)
    for i, img in enumerate(images):
        path = os.path.join(image_root, img["file_name"])
        label = f"image id {img['id']!r} ({path})"
        if os.path.getsize(path) == 0:
            raise DatasetError(f"{where}: {label} is an empty file")
        try:
            with Image.open(path) as image:  # reads the header only
                width, height = image.size
                raw_exif = image.info.get("exif")  # getexif() would decode a PNG to look past its pixels
            if raw_exif:
                exif = Image.Exif()
                exif.load(raw_exif)
                if exif.get(0x0112) in _ROTATED:
                    width, height = height, width
        except (OSError, SyntaxError, ValueError) as exc:  # PIL's errors for unknown or broken headers
            raise DatasetError(f"{where}: {label} is not an image PIL can read "
                               f"({type(exc).__name__}: {str(exc).split(' <')[0]})") from None
        if (width, height) != (img["width"], img["height"]):
            raise DatasetError(f"{where}: {label} is {width}x{height} pixels, the json says "
                               f"{img['width']}x{img['height']} (width x height)")
        if len(images) >= _PROGRESS_FROM and (i + 1) % step == 0:
            logger.info("%s: checked %d of %d image headers (%.0f s)", where, i + 1, len(images),
                        time.perf_counter() - started)


class NamedImageErrors:
    """A dataset mapper whose image-reading failures (a file truncated or changed after the check) name the
    file, the dataset and the image id, instead of PIL's bare "image file is truncated"."""

    def __init__(self, mapper, datasets):
        self.mapper, self.datasets = mapper, datasets

    def __call__(self, record):
        from detectron2.data.detection_utils import SizeMismatchError

        try:
            return self.mapper(record)
        except (OSError, SyntaxError, SizeMismatchError) as exc:
            raise DatasetError(f"dataset {self.datasets}: image id {record.get('image_id')!r} "
                               f"({record.get('file_name')}) cannot be read during training: "
                               f"{type(exc).__name__}: {str(exc).split(' <')[0]}") from exc


def validate_dataset(name, *, where="", training=False, evaluation=False):
    """Checks a registered dataset before it is used: registered at all (else the closest registered
    names), then a COCO-format one (metadata json_file + image_root) with validate_coco_json, a Pascal VOC
    one (metadata dirname + split) for its folders. Other datasets are only checked for registration.
    `where` (e.g. the config key naming the dataset) prefixes the error messages."""
    where = f"{where}: " if where else ""
    registered = DatasetCatalog.list()
    if name not in registered:
        close = difflib.get_close_matches(str(name), registered, n=3, cutoff=0.6)
        raise DatasetError(f"{where}dataset {name!r} is not registered",
                           hint=(f"did you mean {', '.join(close)}? " if close else "") +
                           "or give the dataset by path: --train-dataset / --test-dataset [NAME=]ann.json:images/")
    meta = MetadataCatalog.get(name)
    json_file, image_root = meta.get("json_file", None), meta.get("image_root", None)
    try:
        if json_file and image_root:
            return validate_coco_json(json_file, image_root, training=training, evaluation=evaluation)
        if meta.get("dirname", None) and meta.get("split", None):
            dirname = Path(meta.dirname)
            for path in (dirname / "ImageSets" / "Main" / f"{meta.split}.txt", dirname / "Annotations",
                         dirname / "JPEGImages"):
                if not path.exists():
                    raise DatasetError(f"Pascal VOC folder {dirname}: {path.relative_to(dirname)} not found",
                                       hint="detectron2's VOC names live under $DETECTRON2_DATASETS "
                                            "(default ./datasets)")
    except DatasetError as exc:
        raise DatasetError(f"{where}dataset {name!r}: {exc}", hint=exc.hint) from None
    return {}


def _outside(x0, y0, x1, y1, width, height):
    return x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height


def _box_usable(obj, record):
    """True for a box training keeps, False for one of width or height <= 0, None for one entirely outside the
    record's image (relative or rotated boxes, and records without a size, are left to detectron2: True)."""
    from detectron2.structures import BoxMode

    box, mode = obj.get("bbox"), obj.get("bbox_mode", BoxMode.XYWH_ABS)
    if box is None or len(box) != 4 or mode not in (BoxMode.XYWH_ABS, BoxMode.XYXY_ABS):
        return True
    x0, y0 = box[0], box[1]
    x1, y1 = (x0 + box[2], y0 + box[3]) if mode == BoxMode.XYWH_ABS else (box[2], box[3])
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return False
    if "width" in record and "height" in record and _outside(x0, y0, x1, y1, record["width"], record["height"]):
        return None
    return True


def drop_degenerate_boxes(dataset_dicts, drop_empty_images=True):
    """The one rule for invalid boxes, on detectron2 dataset dicts of any dataset: annotations whose box has a width
    or height <= 0 are removed from training (and then images left without annotations, when drop_empty_images,
    as detectron2 drops images without annotations). Evaluation reads the json as it is, so such a box stays in the
    ground truth there, as in every COCO evaluation; boxes extending past the image are kept (detectron2 clips),
    boxes entirely outside it are dropped too. lgd-train's loader applies it. Returns (dicts, number of boxes
    dropped, number of images dropped); warns when any is dropped."""
    kept, boxes, images, outside = [], 0, 0, 0
    for record in dataset_dicts:
        annotations = record.get("annotations")
        if annotations:
            good = [a for a in annotations if _box_usable(a, record)]
            outside += sum(_box_usable(a, record) is None for a in annotations)
            if len(good) != len(annotations):
                boxes += len(annotations) - len(good)
                record = dict(record, annotations=good)
                if not good and drop_empty_images:
                    images += 1
                    continue
        kept.append(record)
    if boxes:
        left = f" and {images} images left without boxes" if images else ""
        logger.warning("training data: dropped %d boxes with a width or height <= 0, %d entirely outside their "
                       "image%s", boxes - outside, outside, left)
    return kept, boxes, images
