"""FCOS R50-FPN 1x multi-scale with LGD (lgd/configs/_lgd_config.py)."""
from lgd.configs._lgd_config import make

dataloader, lgd, model, optimizer, train = make("fcos", 50, "1x", multiscale=True)
