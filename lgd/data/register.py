"""Registering datasets by path with detectron2's catalogs, idempotently.

COCO-format json (any detector dataset exported to COCO):

    name = register_coco_by_path("mytrees=annotations/train.json:images/")   # -> "mytrees"
    name = register_coco_by_path("annotations/val.json:images/")             # -> "val" (the json's stem)

then point a config at it (``dataloader.train.dataset.names=mytrees``); evaluation uses COCOEvaluator.

Pascal VOC: detectron2 registers the VOC splits itself when ``detectron2.data`` is imported, under the root
``$DETECTRON2_DATASETS`` (default ``./datasets``): put ``VOC2007/`` and ``VOC2012/`` (each with Annotations/,
ImageSets/Main/, JPEGImages/) there and use the names ``voc_2007_trainval``, ``voc_2012_trainval``,
``voc_2007_test`` (evaluated by PascalVOCDetectionEvaluator, 20 classes). A VOC-layout folder elsewhere can
be registered with register_voc_by_path. Registering a name again with the same files is a no-op; with
other files it is a ValueError (detectron2 would keep the first silently or fail later).
"""
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.data.datasets.pascal_voc import CLASS_NAMES as VOC_CLASS_NAMES
from detectron2.data.datasets.pascal_voc import register_pascal_voc

_SPEC_FORMAT = "[NAME=]ANNOTATIONS.json:IMAGE_ROOT"


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
