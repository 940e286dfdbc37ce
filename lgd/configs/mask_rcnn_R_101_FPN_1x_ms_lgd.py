"""Mask R-CNN R101-FPN 1x multi-scale with LGD (lgd/configs/_lgd_config.py)."""
from lgd.configs._lgd_config import make

dataloader, lgd, model, optimizer, train = make("mask_rcnn", 101, "1x", multiscale=True)
