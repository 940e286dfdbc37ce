"""RetinaNet R50-FPN 1x with LGD (LGD_SPEC §8): detectron2's stock model-zoo config plus an `lgd` section.

    lgd-train --config-file lgd/configs/retinanet_R_50_FPN_1x_lgd.py --num-gpus 8

Everything but `lgd` is detectron2's COCO-Detection/retinanet_R_50_FPN_1x.py, unchanged except as noted. The
LR schedule of an LGD run comes from lgd.* (lgd.train_net builds it; cfg.lr_multiplier is not used), scaled
to train.max_iter when that differs from lgd.max_iter (see lgd.train_net).
"""
from detectron2 import model_zoo

_base = model_zoo.get_config("COCO-Detection/retinanet_R_50_FPN_1x.py")
dataloader = _base.dataloader
model = _base.model
train = _base.train
optimizer = _base.optimizer
lr_multiplier = _base.lr_multiplier  # kept for reference only: lgd.train_net uses lgd.steps / lgd.warmup_iters

# SGD as in the authors' code, batch 16 (dataloader.train.total_batch_size): the student (+ adapter) optimizer.
optimizer.lr = 0.01
optimizer.momentum = 0.9
optimizer.weight_decay = 1e-4

# detectron2's fast COCOeval needs its C++ extension, which a Python-only detectron2 install lacks.
dataloader.evaluator.use_fast_impl = False

lgd = dict(
    # length the iteration counts below are written for (the paper's 1x); when train.max_iter differs, every
    # count is scaled by train.max_iter / max_iter (lgd.train_net.build_schedule)
    max_iter=90000,
    steps=(60000, 80000),       # LR / 10 at these iterations (both optimizers)
    warmup_iters=1000,          # detectron2's linear LR warm-up
    warmup_factor=0.001,
    distill_start_iter=30000,   # loss_distill reaches the student from here (before: it trains the adapter only)
    backbone_freeze_iters=10000,  # the student's bottom-up backbone (not the FPN) gets no update before this
    distill_weight=1.0,         # weight of loss_distill
    teacher_lr=0.01,            # the second optimizer (label/appearance encoders, relation adapter, mapper)
    clip_grad_norm=None,        # per-optimizer gradient clipping (None: off, as in the paper)
    backend="auto",             # lgd_ops backend: "auto" (fused kernels when built) or "reference"
)
train.max_iter = lgd["max_iter"]
