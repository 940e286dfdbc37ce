"""Datasets for lgd: registration by path and CrowdHuman (the demo's data lives in lgd.demo).

- lgd.data.register: register_coco_by_path("[NAME=]ann.json:images/"), register_voc_by_path (Pascal VOC);
  validate_coco_json / validate_dataset (what the commands check before writing; the invalid-box rule).
- lgd.data.crowdhuman: CrowdHuman .odgt -> detectron2 dicts, ignore regions as iscrowd annotations
  (register_crowdhuman; evaluate with lgd.evaluation.MissRateEvaluator).
"""
from .crowdhuman import load_crowdhuman_odgt, register_crowdhuman
from .register import register_coco_by_path, register_coco_once, register_voc_by_path

__all__ = [
    "load_crowdhuman_odgt",
    "register_coco_by_path",
    "register_coco_once",
    "register_crowdhuman",
    "register_voc_by_path",
]
