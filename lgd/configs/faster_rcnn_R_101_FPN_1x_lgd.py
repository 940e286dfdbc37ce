"""Faster R-CNN R101-FPN 1x single-scale with LGD (lgd/configs/_lgd_config.py)."""
from lgd.configs._lgd_config import make

dataloader, lgd, model, optimizer, train = make("faster_rcnn", 101, "1x", multiscale=False)
