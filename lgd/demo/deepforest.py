"""The demo's data: deepforest's real NEON aerial images (Pascal VOC boxes) as tiled COCO datasets, one class.

Source (scripts/fetch_demo_assets.sh, lgd.demo.assets): deepforest 2.1.0's bundled data, four annotated RGB images
at 10 cm/pixel, 951 tree-crown boxes ("Tree", and SOAP_061's "Dead"/"Alive", all mapped to "Tree"):

    image (xml)                                size        boxes  split
    2019_YELL_2_528000_4978000_image_crop2    2299x2472    574  train
    OSBS_029 (.tif)                             400x400      61  train
    SOAP_061                                    400x400      37  train
    2019_YELL_2_541000_4977000_image_crop     1249x1035    279  val

Splits are by source image, so no tile of a validation image is seen in training: the fixed split above (its val
image comes from the site and season of the largest training image), or fold k of DEMO_FOLDS holding out image k.
With 400 px tiles overlapping by 50 px the fixed split has 51 train tiles (909 boxes) and 12 val tiles (390 boxes).
The conversion runs once per split into the cache, versioned by CONVERTER_VERSION.
"""
import itertools
import json
import logging
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..data.register import register_coco_once
from .assets import DEEPFOREST_ASSETS, cache_root, demo_asset_dir

logger = logging.getLogger(__name__)

CONVERTER_VERSION = 1  # bump it whenever the conversion's output changes: the cache is keyed on it
DEMO_CATEGORY = "Tree"
DEMO_LABEL_MAP = {"Tree": DEMO_CATEGORY, "Dead": DEMO_CATEGORY, "Alive": DEMO_CATEGORY}
DEMO_VAL_IMAGES = ("2019_YELL_2_541000_4977000_image_crop",)
# the 4 annotated source images; fold k holds out DEMO_FOLDS[k] for validation (fold 0: the fixed split above)
DEMO_FOLDS = ("2019_YELL_2_541000_4977000_image_crop", "2019_YELL_2_528000_4978000_image_crop2", "OSBS_029",
              "SOAP_061")
DEMO_TILING = {"tile_size": 400, "overlap": 50, "min_visible": 0.5, "min_side": 2.0}
DEMO_TRAIN, DEMO_VAL = "lgd_demo_train", "lgd_demo_val"
SPLITS = ("train", "val")


def read_voc_xml(xml_file, label_map):
    """One Pascal VOC xml -> (image path, (height, width), boxes [N, 4] float64 XYXY, category names [N]).

    The image is the xml's <filename> next to the xml (or, if absent, the same stem with .png/.tif/.jpg).
    Boxes are clipped to the image; boxes with no area left are dropped (logged).
    """
    xml_file = Path(xml_file)
    root = ET.parse(xml_file).getroot()
    width, height = (int(root.findtext(f"size/{key}")) for key in ("width", "height"))
    image = xml_file.parent / root.findtext("filename", default="").strip()
    if not image.is_file():
        candidates = [xml_file.with_suffix(ext) for ext in (".png", ".tif", ".jpg")]
        image = next((path for path in candidates if path.is_file()), None)
        if image is None:
            raise FileNotFoundError(
                f"xml_file {xml_file}: no image as named in <filename>, nor any of {[c.name for c in candidates]}")
    boxes, names = [], []
    for obj in root.iter("object"):
        name = obj.findtext("name", default="").strip()
        if name not in label_map:
            raise ValueError(f"label_map has no entry for label {name!r} found in {xml_file}")
        boxes.append([float(obj.findtext(f"bndbox/{key}")) for key in ("xmin", "ymin", "xmax", "ymax")])
        names.append(label_map[name])
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if not keep.all():
        logger.warning("%s: dropped %d boxes with no area inside the image", xml_file.name, int((~keep).sum()))
    return image, (height, width), boxes[keep], [n for n, k in zip(names, keep) if k]


def tile_origins(length, tile_size, overlap):
    """Start offsets of the tiles covering [0, length): step tile_size - overlap, the last one flush with the end."""
    if not 0 <= overlap < tile_size:
        raise ValueError(f"overlap must be in [0, tile_size={tile_size}), got {overlap}")
    if length <= tile_size:
        return [0]
    return list(range(0, length - tile_size, tile_size - overlap)) + [length - tile_size]


def boxes_in_tile(boxes, tile, min_visible, min_side):
    """Indices and tile-relative clipped boxes of ``boxes`` [N, 4] kept in ``tile`` = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = tile
    clipped = np.stack([boxes[:, 0].clip(x0, x1), boxes[:, 1].clip(y0, y1),
                        boxes[:, 2].clip(x0, x1), boxes[:, 3].clip(y0, y1)], axis=1)
    widths, heights = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = (np.minimum(widths, heights) >= min_side) & (widths * heights >= min_visible * areas)
    index = np.flatnonzero(keep)
    return index, clipped[index] - np.array([x0, y0, x0, y0], dtype=np.float64)


def _check_tiling(tile_size, overlap, min_visible, min_side):
    if not (isinstance(tile_size, int) and tile_size > 0):
        raise ValueError(f"tile_size must be a positive int, got {tile_size!r}")
    if not (isinstance(overlap, int) and 0 <= overlap < tile_size):
        raise ValueError(f"overlap must be an int in [0, tile_size={tile_size}), got {overlap!r}")
    if not 0 < min_visible <= 1:
        raise ValueError(f"min_visible must be in (0, 1], got {min_visible!r}")
    if not min_side >= 0:
        raise ValueError(f"min_side must be >= 0, got {min_side!r}")


def convert_voc_to_tiled_coco(xml_files, out_dir, val_images, label_map, tile_size=400, overlap=50,
                              min_visible=0.5, min_side=2.0):
    """Tile the images of ``xml_files`` into a COCO dataset at ``out_dir`` (created atomically; must not exist).

    ``val_images``: stems of the xml files whose tiles form the val split (all others: train); each must be
    one of ``xml_files``. Returns the manifest dict (parameters and per-split image/box/empty-tile counts).
    All in pixels:

    - Labels: every name in ``label_map`` becomes one category; an unknown name is a ValueError.
    - Boxes are read as written in the xml (deepforest's convention: 0-based pixel coordinates, x2/y2 exclusive;
      unlike detectron2's VOC loader no 1 is subtracted), clipped to the image; empty boxes are dropped.
    - Tiles: ``tile_size`` squares, neighbours overlapping by at least ``overlap`` pixels, the last row/column
      aligned to the image's far edge (so every tile is full-size; an image smaller than a tile is one tile).
    - A box is kept in a tile, shifted by the tile origin and clipped to it, iff its visible part covers at least
      ``min_visible`` of its area and both visible sides are at least ``min_side`` pixels: crowns cut to slivers
      by a tile edge are dropped (the neighbouring tile, overlapping, usually holds them whole). Boxes near tile
      borders appear in both overlapping tiles, in val too (each tile is evaluated as its own image).
    - Tiles without any kept box are kept (hard negatives unless the loader filters empty images, as detectron2's
      does by default) and counted as "empty" in the stats.
    - Output: ``images/<source>_x<X>_y<Y>.png`` (lossless) plus ``train.json``/``val.json`` (COCO; each image entry
      also records ``source_image`` and ``tile_origin``), plus ``manifest.json`` (parameters, per-split counts).
      The folder appears by one rename of a finished temporary folder, so readers never see a partial one.
    """
    _check_tiling(tile_size, overlap, min_visible, min_side)
    xml_files = sorted(Path(f) for f in xml_files)
    stems = [f.stem for f in xml_files]
    unknown = sorted(set(val_images) - set(stems))
    if unknown:
        raise ValueError(f"val_images {unknown} are not among the xml files {stems}")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ValueError(f"out_dir {out_dir} already exists")
    categories = sorted(set(label_map.values()))
    category_ids = {name: i + 1 for i, name in enumerate(categories)}
    splits = {split: {"images": [], "annotations": [],
                      "categories": [{"id": i, "name": n} for n, i in category_ids.items()]} for split in SPLITS}
    stats = {split: {"source_images": [], "images": 0, "boxes": 0, "empty_images": 0, "source_boxes": 0}
             for split in SPLITS}

    image_ids, annotation_ids = itertools.count(1), itertools.count(1)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (tmp / "images").mkdir()
        for xml_file in tqdm(xml_files, desc="tiling images", unit="image"):
            split = "val" if xml_file.stem in val_images else "train"
            image_path, (height, width), boxes, names = read_voc_xml(xml_file, label_map)
            with Image.open(image_path) as im:
                image = im.convert("RGB")
            if image.size != (width, height):
                raise ValueError(f"{xml_file}: <size> says {width}x{height}, image {image_path.name} is "
                                 f"{image.size[0]}x{image.size[1]}")
            stats[split]["source_images"].append(xml_file.stem)
            stats[split]["source_boxes"] += len(boxes)
            for y0 in tile_origins(height, tile_size, overlap):
                for x0 in tile_origins(width, tile_size, overlap):
                    tile = (x0, y0, min(x0 + tile_size, width), min(y0 + tile_size, height))
                    file_name = f"images/{xml_file.stem}_x{x0}_y{y0}.png"
                    image.crop(tile).save(tmp / file_name)
                    image_id = next(image_ids)
                    splits[split]["images"].append({
                        "id": image_id, "file_name": file_name, "width": tile[2] - x0, "height": tile[3] - y0,
                        "source_image": xml_file.stem, "tile_origin": [x0, y0]})
                    index, tile_boxes = boxes_in_tile(boxes, tile, min_visible, min_side)
                    for i, (bx0, by0, bx1, by1) in zip(index, tile_boxes.tolist()):
                        splits[split]["annotations"].append({
                            "id": next(annotation_ids), "image_id": image_id, "category_id": category_ids[names[i]],
                            "bbox": [bx0, by0, bx1 - bx0, by1 - by0], "area": (bx1 - bx0) * (by1 - by0),
                            "iscrowd": 0})
                    stats[split]["images"] += 1
                    stats[split]["boxes"] += len(index)
                    stats[split]["empty_images"] += len(index) == 0
        for split, coco in splits.items():
            (tmp / f"{split}.json").write_text(json.dumps(coco))
        manifest = {"converter_version": CONVERTER_VERSION, "categories": categories, "label_map": label_map,
                    "val_images": sorted(val_images), "tile_size": tile_size, "overlap": overlap,
                    "min_visible": min_visible, "min_side": min_side, "stats": stats}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _fold_images(fold):
    if fold is None:
        return DEMO_VAL_IMAGES
    if not isinstance(fold, int) or not 0 <= fold < len(DEMO_FOLDS):
        raise ValueError(f"fold must be an integer in [0, {len(DEMO_FOLDS)}) (the held-out source image), got {fold!r}")
    return (DEMO_FOLDS[fold],)


def demo_dataset_names(fold=None):
    """(train, val) dataset names of the demo split (fold None) or of cross-validation fold `fold`."""
    if fold is None:
        return DEMO_TRAIN, DEMO_VAL
    _fold_images(fold)
    return f"lgd_demo_fold{fold}_train", f"lgd_demo_fold{fold}_val"


def prepare_demo_dataset(cache_dir=None, fold=None):
    """Convert the fetched deepforest data into the tiled demo dataset, once (cached, versioned).

    fold: None for the fixed split (module docstring), or k in 0..3 to validate on the source image
    DEMO_FOLDS[k] and train on the other three (4-fold cross-validation by source image; fold 0 = the fixed split).

    Returns {"train_json", "val_json", "image_root" (both splits' file_names are relative to it),
    "dataset_dir", "stats" (per split: source_images, images, boxes, empty_images, source_boxes)}.
    Raises lgd.demo.assets.AssetsMissingError if scripts/fetch_demo_assets.sh has not been run.
    """
    assets = demo_asset_dir(cache_dir)
    val_images = _fold_images(fold)
    params = "t{tile_size}-o{overlap}".format(**DEMO_TILING) + (f"-fold{fold}" if fold else "")
    dataset_dir = cache_root(cache_dir) / "datasets" / f"{DEEPFOREST_ASSETS}-tiles-v{CONVERTER_VERSION}-{params}"
    if not dataset_dir.is_dir():
        logger.info("converting the deepforest demo data into %s", dataset_dir)
        try:
            convert_voc_to_tiled_coco(sorted(assets.glob("*.xml")), dataset_dir, val_images, DEMO_LABEL_MAP,
                                      **DEMO_TILING)
        except (ValueError, OSError):
            if not dataset_dir.is_dir():  # else another process finished the same conversion first
                raise
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    return {"train_json": str(dataset_dir / "train.json"), "val_json": str(dataset_dir / "val.json"),
            "image_root": str(dataset_dir), "dataset_dir": str(dataset_dir), "stats": manifest["stats"]}


def register_demo_datasets(cache_dir=None, fold=None):
    """Register "lgd_demo_train" and "lgd_demo_val" (fold None) or "lgd_demo_fold<k>_train" / "..._val"
    (COCO json, one class "Tree"), preparing the data if needed.

    Idempotent. Returns prepare_demo_dataset()'s dict.
    """
    paths = prepare_demo_dataset(cache_dir, fold)
    for name, split in zip(demo_dataset_names(fold), ("train", "val")):
        register_coco_once(name, paths[f"{split}_json"], paths["image_root"], {"thing_classes": [DEMO_CATEGORY]})
    return paths
