"""Faster R-CNN R101-DCNv2-FPN 2x multi-scale with LGD (lgd/configs/_lgd_config.py, make_dcn)."""
from lgd.configs._lgd_config import make_dcn

dataloader, lgd, model, optimizer, train = make_dcn("faster_rcnn", "R_101_DCNv2", "2x", multiscale=True)
