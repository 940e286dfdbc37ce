"""RetinaNet R50-FPN 2x with LGD: the 1x config with the paper's 2x schedule (LGD_SPEC §8): 180k iterations,
LR steps at 120k / 160k, distillation still from 30k, the bottom-up backbone frozen for the first 20k."""
from .retinanet_R_50_FPN_1x_lgd import dataloader, lgd, lr_multiplier, model, optimizer, train

lgd.update(max_iter=180000, steps=(120000, 160000), backbone_freeze_iters=20000)
train.max_iter = lgd["max_iter"]
lr_multiplier.scheduler.milestones = [120000, 160000, 180000]
lr_multiplier.warmup_length = 1000 / 180000

__all__ = ["dataloader", "lgd", "lr_multiplier", "model", "optimizer", "train"]
