"""Datasets for lgd: the bundled real demo data, registration by path, CrowdHuman.

- lgd.data.assets: the cache ($LGD_CACHE, ~/.cache/lgd) and the fetched demo assets (demo_asset_dir,
  mobilenetv2_weights_path; scripts/fetch_demo_assets.sh downloads them).
- lgd.data.deepforest: deepforest's aerial tree images as a tiled COCO dataset (prepare_demo_dataset,
  register_demo_datasets -> "lgd_demo_train" / "lgd_demo_val"; 4 cross-validation folds by source image).
- lgd.data.register: register_coco_by_path("[NAME=]ann.json:images/"), register_voc_by_path (Pascal VOC);
  validate_coco_json / validate_dataset (what the commands check before writing; the invalid-box rule).
- lgd.data.crowdhuman: CrowdHuman .odgt -> detectron2 dicts, ignore regions as iscrowd annotations
  (register_crowdhuman; evaluate with lgd.evaluation.MissRateEvaluator).
"""
from .assets import AssetsMissingError, cache_root, demo_asset_dir, mobilenetv2_weights_path
from .crowdhuman import load_crowdhuman_odgt, register_crowdhuman
from .deepforest import DEMO_FOLDS, DEMO_TRAIN, DEMO_VAL, demo_dataset_names, prepare_demo_dataset, register_demo_datasets
from .register import register_coco_by_path, register_coco_once, register_voc_by_path

__all__ = [
    "AssetsMissingError",
    "DEMO_FOLDS",
    "DEMO_TRAIN",
    "DEMO_VAL",
    "cache_root",
    "demo_asset_dir",
    "demo_dataset_names",
    "load_crowdhuman_odgt",
    "mobilenetv2_weights_path",
    "prepare_demo_dataset",
    "register_coco_by_path",
    "register_coco_once",
    "register_crowdhuman",
    "register_demo_datasets",
    "register_voc_by_path",
]
