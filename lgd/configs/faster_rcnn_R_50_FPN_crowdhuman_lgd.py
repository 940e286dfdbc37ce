"""Faster R-CNN R50-FPN with LGD on CrowdHuman (lgd/configs/_lgd_config.py, make_crowdhuman)."""
from lgd.configs._lgd_config import make_crowdhuman

dataloader, lgd, model, optimizer, train = make_crowdhuman("faster_rcnn")
