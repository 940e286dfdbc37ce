"""Faster R-CNN R50-FPN with LGD on Pascal VOC 07+12 (lgd/configs/_lgd_config.py, make_voc)."""
from lgd.configs._lgd_config import make_voc

dataloader, lgd, model, optimizer, train = make_voc("faster_rcnn")
