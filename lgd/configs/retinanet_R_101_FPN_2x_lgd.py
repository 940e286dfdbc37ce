"""RetinaNet R101-FPN 2x single-scale with LGD (lgd/configs/_lgd_config.py)."""
from lgd.configs._lgd_config import make

dataloader, lgd, model, optimizer, train = make("retinanet", 101, "2x", multiscale=False)
