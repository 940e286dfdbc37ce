"""FCOS X101-32x8d-DCNv2-FPN 2x multi-scale with LGD (lgd/configs/_lgd_config.py, make_dcn)."""
from lgd.configs._lgd_config import make_dcn

dataloader, lgd, model, optimizer, train = make_dcn("fcos", "X_101_32x8d_DCNv2", "2x", multiscale=True)
