"""The CPU demo: a small RetinaNet (ImageNet MobileNetV2 + 64-channel FPN and head) with LGD on the deepforest
tree-crown tiles (lgd.demo.deepforest: "lgd_demo_train" / "lgd_demo_val", one class "Tree", ~400 px tiles).

    lgd-demo                                   # prepares the data, trains, evaluates, plots
    lgd-train --config-file lgd/demo/configs/retinanet_mobilenetv2_lgd.py train.max_iter=600

Built on lgd/configs/retinanet_R_50_FPN_1x_lgd.py (its optimizer, evaluator and `lgd` keys), changed as
noted below. lgd.schedule is the paper's 1x (distillation from 1/3 of the run, the bottom-up backbone frozen
for the first 1/9, LR / 10 at 2/3 and 8/9) scaled to whatever train.max_iter the demo picks; its LR warm-up
(11 %) is longer than the paper's 1.1 %, and gradients are norm-clipped: a fresh head trained with batches of
4 tiles diverges without them. The head's convs are group-normalized (see below and lgd.modeling.norm).
"""
import torch
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T
from detectron2.layers import ShapeSpec

from lgd.demo.assets import mobilenetv2_weights_path
from lgd.demo.backbone import build_mobilenetv2_fpn
from lgd.modeling.norm import group_norm

from ...configs.retinanet_R_50_FPN_1x_lgd import dataloader, lgd, model, optimizer, train

CHANNELS = 64
IMAGE_SIZE = 400  # the demo tiles' side: no resizing

# ImageNet MobileNetV2 (torchvision layout, RGB, ImageNet mean/std) with FrozenBN, FPN p3-p7 of 64 channels
model.backbone = L(build_mobilenetv2_fpn)(weights=L(mobilenetv2_weights_path)(), out_channels=CHANNELS,
                                          norm="FrozenBN")
model.pixel_mean = [123.675, 116.28, 103.53]
model.pixel_std = [58.395, 57.12, 57.375]
model.input_format = "RGB"
model.num_classes = 1
model.head.input_shape = [ShapeSpec(channels=CHANNELS)] * 5
model.head.conv_dims = [CHANNELS, CHANNELS]
# GroupNorm in the head's convs: without it the std-0.01 init of a 64-channel head barely learns in 300
# iterations (lgd.modeling.norm; measured in benchmarks/README.md, demo section)
model.head.norm = group_norm
# tree crowns on 400 px tiles are ~10-100 px: anchors one octave smaller than COCO's
model.anchor_generator.sizes = [[s * 2 ** (k / 3) for k in range(3)] for s in (16, 32, 64, 128, 256)]

dataloader.train.dataset.names = "lgd_demo_train"
dataloader.train.mapper.image_format = "RGB"
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=IMAGE_SIZE, max_size=IMAGE_SIZE),
    L(T.RandomFlip)(horizontal=True),
    L(T.RandomFlip)(horizontal=False, vertical=True),  # aerial views: vertical flips are as valid
]
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = 1
dataloader.test.dataset.names = "lgd_demo_val"
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=IMAGE_SIZE, max_size=IMAGE_SIZE)]
dataloader.test.num_workers = 1

# batch 4: half the paper's LR for batch 16 (0.01 diverged once the backbone trained: benchmarks/README.md)
optimizer.lr = 0.005
train.init_checkpoint = ""  # the backbone's ImageNet weights come from model.backbone.weights
train.device = "cuda" if torch.cuda.is_available() else "cpu"  # where it is started, without a fallback warning
train.output_dir = "./output/demo_lgd"
train.checkpointer = dict(period=100, max_to_keep=2)
train.eval_period = 0  # evaluated once, at the end
train.log_period = 10

# the paper's 1x schedule scaled to train.max_iter, with an 11 % LR warm-up (the paper's: 1.1 %)
lgd.schedule.warmup_iters = lgd.schedule.max_iter // 9
lgd.update(
    teacher_lr=0.005,
    op_report_period=100,
)
# the comparison systems' cheap settings: FGFI's teacher is the demo's own detector (a baseline run of this config;
# the COCO configs' R-101 teacher has no MobileNetV2 counterpart); LabelEnc's step 1 is this detector too, for
# 4/3 of the run's iterations (the authors' proportion, lgd.methods.labelenc.STEP1_SCHEDULE)
lgd.fgfi.teacher_overrides = []
lgd.labelenc.step1_overrides = []
# norm clipping at 10 per part (student, teacher), both modes alike, in place of the paper's value
# clipping at 1.0: a bad batch of 4 tiles must not blow the run up
train.clip_gradients.update(clip_type="norm", clip_value=10.0)
train.max_iter = 600
# the fast path (lgd-train --fast: bf16 autocast + channels_last where the device has native bf16, else fp32 with
# a warning); lgd-demo --fp32 or train.amp.enabled=False for fp32 NCHW. Same AP within the seed noise, half the
# step time on 2 CPU cores (benchmarks/README.md, demo section)
train.amp.enabled = True
