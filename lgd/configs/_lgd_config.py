"""make(): the LGD LazyConfig of one detector x depth x schedule x input scale, from detectron2's stock configs.

Every lgd/configs/<detector>_R_<depth>_FPN_<schedule>[_ms]_lgd.py is one call of make(); run one with

    lgd-train --config-file lgd/configs/mask_rcnn_R_101_FPN_2x_ms_lgd.py --num-gpus 8

and the paper's DCN rows (DCN_ROWS) are lgd/configs/<detector>_<backbone>_FPN_2x_ms_lgd.py, one call of
make_dcn() each: R-101 DCN v2 for RetinaNet, FCOS and Faster R-CNN, ResNeXt-101 32x8d DCN v2 for FCOS.
<detector>_R_50_FPN_{voc,crowdhuman}_lgd.py are its Pascal VOC and CrowdHuman rows (make_voc, make_crowdhuman).
docs/paper.md has the command of every row of the paper's tables.

Sections: dataloader, model, optimizer, train are detectron2's model-zoo LazyConfig of the detector, unchanged
except as noted below; `lgd` holds the method switch, the schedule and the lgd_ops backend (SHARED) and every
method's settings, written once in its DEFAULTS (method_settings: LGD's as top-level lgd.* keys, the others'
under lgd.<method>). lgd.schedule (the paper's 1x or 2x, lgd.engine.schedule.PAPER_SCHEDULES) replaces
detectron2's lr_multiplier and is scaled to train.max_iter for shorter runs. train.amp gets the fast path's
precision and channels_last (AMP), train.clip_gradients the gradient clipping (CLIP_GRADIENTS).

Stock sources: RetinaNet COCO-Detection/retinanet_R_50_FPN_1x.py; FCOS COCO-Detection/fcos_R_50_FPN_1x.py
with lgd.modeling.fcos_head.FCOSHead (v0.6's head does not build on recent torch); Mask R-CNN
COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py; Faster R-CNN = that config without the mask head
(detectron2 v0.6 ships no Faster R-CNN LazyConfig). Changes, following the paper's setup: R101 = depth 101
and the MSRA R-101 ImageNet weights; single-scale = shorter side 800 (the stock LazyConfig data is
multi-scale), multi-scale ("_ms") = shorter side drawn from 640..800 (step 32), both max 1333 and flipped;
SGD lr 0.01 (RetinaNet, FCOS) or 0.02 (R-CNN), momentum 0.9, weight decay 1e-4 on every parameter (norm
layers included), gradient value clipping at 1.0, batch 16; no context object for FCOS R50; 1x = 90k
iterations (LR steps 60k, 80k; backbone frozen 10k), 2x = 180k (120k, 160k; frozen 20k), distillation
from 30k in both; COCO evaluation without detectron2's C++ COCOeval (a Python-only install lacks it). The
comparison systems run as the paper ran them: FGFI's teacher is the R-101 of the same detector for the R-50
configs, LabelEnc's step 1 the authors' R-50 for the others (BACKBONE_OVERRIDES).
"""
import copy
import dataclasses

import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from lgd.modeling.deform import make_resnet_stages
from lgd.modeling.fcos_head import FCOSHead
from lgd.engine.schedule import PAPER_SCHEDULES
from lgd.methods import METHOD_REGISTRY

# detector -> (stock model-zoo config, base LR at batch 16)
DETECTORS = {
    "retinanet": ("COCO-Detection/retinanet_R_50_FPN_1x.py", 0.01),
    "fcos": ("COCO-Detection/fcos_R_50_FPN_1x.py", 0.01),
    "faster_rcnn": ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py", 0.02),
    "mask_rcnn": ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py", 0.02),
}
DEPTHS = {50: "detectron2://ImageNetPretrained/MSRA/R-50.pkl", 101: "detectron2://ImageNetPretrained/MSRA/R-101.pkl"}
# the paper's DCN backbones, as the authors' configs build them: deformable conv v2 (modulated) on res3..res5, on
# lgd.modeling.deform (torchvision's deform_conv2d, CPU and CUDA); the "R-101 DCN" rows are v2
# too. name -> (make_resnet_stages settings, ImageNet weights, PIXEL_STD or None for the stock config's)
DCN_BACKBONES = {
    "R_101_DCNv2": (dict(depth=101, stride_in_1x1=True), DEPTHS[101], None),
    "X_101_32x8d_DCNv2": (dict(depth=101, num_groups=32, width_per_group=8, stride_in_1x1=False),
                          "detectron2://ImageNetPretrained/FAIR/X-101-32x8d.pkl", [57.375, 57.120, 58.395]),
}
# the paper's DCN rows: (detector, backbone), all 2x multi-scale
DCN_ROWS = [("retinanet", "R_101_DCNv2"), ("fcos", "R_101_DCNv2"), ("faster_rcnn", "R_101_DCNv2"),
            ("fcos", "X_101_32x8d_DCNv2")]
# the DCN rows whose authors' configs turn distillation off for the last 50k of 180k iterations
# (POST_NONDISTILL_ITERS: 50000): lgd.schedule.final_nondistill_iters
FINAL_NONDISTILL_ITERS = {("fcos", "R_101_DCNv2"): 50000, ("fcos", "X_101_32x8d_DCNv2"): 50000}
_STAGES = "model.backbone.bottom_up.stages"
# key=value overrides turning a config's detector into another backbone's: FGFI's teachers (lgd.fgfi.
# teacher_overrides: R-101 for the R-50 configs, the paper's Tables 3 and 7; R-101 DCN v2, Table 3's second FGFI
# row) and LabelEnc's step-1 detector (lgd.labelenc.step1_overrides: the authors' R-50 for every step-2 backbone)
BACKBONE_OVERRIDES = {
    "R_50": [f"{_STAGES}.depth=50", f"train.init_checkpoint={DEPTHS[50]}"],
    "R_101": [f"{_STAGES}.depth=101", f"train.init_checkpoint={DEPTHS[101]}"],
    "R_101_DCNv2": [f"{_STAGES}._target_=lgd.modeling.deform.make_resnet_stages", f"{_STAGES}.depth=101",
                    f"+{_STAGES}.deform_on_per_stage=[False,True,True,True]", f"+{_STAGES}.deform_modulated=True",
                    f"train.init_checkpoint={DEPTHS[101]}"],
}
# from a DCN config back to the plain MSRA R-50 (make_resnet_stages without deformable stages)
DCN_TO_R_50 = [f"{_STAGES}.depth=50", f"{_STAGES}.deform_on_per_stage=[False,False,False,False]",
               f"{_STAGES}.deform_modulated=False", f"{_STAGES}.num_groups=1", f"{_STAGES}.width_per_group=64",
               f"{_STAGES}.stride_in_1x1=True", "model.pixel_std=[1.0,1.0,1.0]", f"train.init_checkpoint={DEPTHS[50]}"]
SCHEDULES = PAPER_SCHEDULES  # "1x", "2x"
SINGLE_SCALE = (800,)
MULTI_SCALE = (640, 672, 704, 736, 768, 800)
MAX_SIZE = 1333

# the lgd.* keys every run reads (lgd.methods.SHARED_KEYS); each method's settings join them (method_settings)
SHARED = dict(
    method="lgd",               # the training method (lgd.methods.METHOD_REGISTRY, docs/methods/README.md): "lgd",
                                # "baseline", or a comparison system: "fgfi", "labelenc", "dml", "ban", "tfkd"
    # the LR, distillation warm-up and backbone-freeze iteration counts (lgd.engine.schedule.LGDSchedule's fields:
    # max_iter, steps, distill_start_iter, backbone_freeze_iters, warmup_iters, warmup_factor), written for
    # schedule.max_iter iterations and scaled to train.max_iter (lgd.engine.schedule)
    schedule=None,
    backend="auto",             # lgd_ops backend: "auto" (fused kernels when built) or "reference"
)
# train.amp's keys beside detectron2's `enabled`: the fast path (lgd.engine.trainer). train.amp.enabled=True
# (lgd-train --fast) runs the model under autocast in `precision`; weights, gradients, optimizer state,
# checkpoints and the losses stay fp32
AMP = dict(
    precision="bf16",           # autocast dtype with train.amp.enabled: "bf16" (CPU with native bf16, i.e.
                                # avx512_bf16/AMX, else fp32 with a warning; CUDA with bf16, else fp16 + a
                                # GradScaler), "fp16" (CUDA: with a GradScaler; CPU: bf16) or "fp32" (no autocast)
    channels_last=None,         # model weights and input images in channels_last: None = on exactly when autocast
                                # runs, True / False forces it (also for fp32 runs)
)
# gradient clipping before each optimizer step, named after detectron2's SOLVER.CLIP_GRADIENTS
CLIP_GRADIENTS = dict(
    clip_type="value",          # "value" (each element to [-clip_value, clip_value], the authors' configs),
    clip_value=1.0,             # "norm" (each part's, student and teacher, total L2 norm <= clip_value) or None (off)
)


def method_settings():
    """The lgd node's method part: every registered method's DEFAULTS at its config node (LGD's as top-level
    lgd.* keys, the others' under lgd.<method>), so that `lgd.fgfi.psi=0.6` or `lgd.distill_weight=2` is a
    checked override (docs/methods/<method>.md lists them)."""
    settings = {}
    for _, method in METHOD_REGISTRY:
        defaults = copy.deepcopy(method.DEFAULTS)
        if not defaults:
            continue
        if method.settings_key() == "lgd":
            settings.update(defaults)
        else:
            settings[method.settings_key()[len("lgd."):]] = defaults
    return settings


def config_name(detector: str, depth: int, schedule: str, multiscale: bool) -> str:
    """The file name (without .py) of one variant under lgd/configs/."""
    return f"{detector}_R_{depth}_FPN_{schedule}{'_ms' if multiscale else ''}_lgd"


def dcn_config_name(detector: str, backbone: str, schedule: str, multiscale: bool) -> str:
    """The file name (without .py) of one DCN variant under lgd/configs/."""
    return f"{detector}_{backbone}_FPN_{schedule}{'_ms' if multiscale else ''}_lgd"


def make_dcn(detector: str, backbone: str, schedule: str = "2x", multiscale: bool = True):
    """make(detector, 101, schedule, multiscale) with a DCN backbone of DCN_BACKBONES (frozen BN, as the stock
    ResNet) and the ImageNet weights it needs."""
    if backbone not in DCN_BACKBONES:
        raise ValueError(f"make_dcn: backbone must be one of {list(DCN_BACKBONES)}, got {backbone!r}")
    stages, weights, pixel_std = DCN_BACKBONES[backbone]
    dataloader, lgd, model, optimizer, train = make(detector, 101, schedule, multiscale)
    model.backbone.bottom_up.stages = L(make_resnet_stages)(
        deform_on_per_stage=[False, True, True, True], deform_modulated=True, norm="FrozenBN", **stages)
    if pixel_std is not None:
        model.pixel_std = pixel_std
    train.init_checkpoint = weights
    lgd["schedule"]["final_nondistill_iters"] = FINAL_NONDISTILL_ITERS.get((detector, backbone), 0)
    lgd["labelenc"]["step1_overrides"] = list(DCN_TO_R_50)
    return dataloader, lgd, model, optimizer, train


def make_voc(detector: str):
    """make(detector, 50, "1x", multiscale=True) on Pascal VOC: trained on VOC 2007+2012 trainval, tested on VOC
    2007 test with detectron2's PascalVOCDetectionEvaluator, 20 classes; detectron2's VOC recipe (shorter side
    480..800 step 32, 18k iterations: the 1x schedule scaled, LR steps 12k and 16k)."""
    from detectron2.evaluation import PascalVOCDetectionEvaluator

    dataloader, lgd, model, optimizer, train = make(detector, 50, "1x", multiscale=True)
    dataloader.train.dataset.names = ("voc_2007_trainval", "voc_2012_trainval")
    dataloader.test.dataset.names = "voc_2007_test"
    dataloader.train.mapper.augmentations[0].short_edge_length = tuple(range(480, 801, 32))
    dataloader.evaluator = L(PascalVOCDetectionEvaluator)(dataset_name="${..test.dataset.names}")
    _set_num_classes(model, 20)
    train.max_iter = 18000
    return dataloader, lgd, model, optimizer, train


def register_crowdhuman_splits(root):
    """Registers "crowdhuman_train" / "crowdhuman_val" (lgd.data.register_crowdhuman) from CrowdHuman's
    layout under root (annotation_train.odgt, annotation_val.odgt, Images/) when it is there; without it the
    names stay unregistered and lgd-train's dataset check names them."""
    import os

    from lgd.data import register_crowdhuman

    for split in ("train", "val"):
        odgt, images = os.path.join(root, f"annotation_{split}.odgt"), os.path.join(root, "Images")
        if os.path.isfile(odgt) and os.path.isdir(images):
            register_crowdhuman(f"crowdhuman_{split}", odgt, images)


def make_crowdhuman(detector: str):
    """make(detector, 50, "1x", multiscale=True) on CrowdHuman (full-body boxes, ignore regions kept as such):
    trained on its train split, tested on val by mMR (lgd.evaluation.MissRateEvaluator), one class. The data:
    $DETECTRON2_DATASETS/CrowdHuman (default ./datasets/CrowdHuman), see register_crowdhuman_splits."""
    import os

    from lgd.evaluation import MissRateEvaluator

    register_crowdhuman_splits(os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "CrowdHuman"))
    dataloader, lgd, model, optimizer, train = make(detector, 50, "1x", multiscale=True)
    dataloader.train.dataset.names = "crowdhuman_train"
    dataloader.test.dataset.names = "crowdhuman_val"
    dataloader.evaluator = L(MissRateEvaluator)(dataset_name="${..test.dataset.names}")
    _set_num_classes(model, 1)
    return dataloader, lgd, model, optimizer, train


def _set_num_classes(model, num_classes):
    """The detector's number of classes: the R-CNN ROI heads', else the dense detector's (its head reads it)."""
    (model.roi_heads if "roi_heads" in model else model).num_classes = num_classes


def make(detector: str, depth: int = 50, schedule: str = "1x", multiscale: bool = False):
    """(dataloader, lgd, model, optimizer, train) of one LGD variant (module docstring)."""
    for name, value, allowed in (("detector", detector, DETECTORS), ("depth", depth, DEPTHS),
                                 ("schedule", schedule, SCHEDULES), ("multiscale", multiscale, (False, True))):
        if value not in allowed or type(value) is not type(next(iter(allowed))):
            raise ValueError(f"make: {name} must be one of {list(allowed)}, got {value!r}")
    source, lr = DETECTORS[detector]
    cfg = model_zoo.get_config(source)
    model, dataloader, train = cfg.model, cfg.dataloader, cfg.train

    if detector == "fcos":
        model.head._target_ = FCOSHead
    if detector == "faster_rcnn":
        model.roi_heads.mask_in_features = model.roi_heads.mask_pooler = model.roi_heads.mask_head = None
    dataloader.train.mapper.use_instance_mask = detector == "mask_rcnn"
    model.backbone.bottom_up.stages.depth = depth
    train.init_checkpoint = DEPTHS[depth]

    dataloader.train.mapper.augmentations = [
        L(T.ResizeShortestEdge)(short_edge_length=MULTI_SCALE if multiscale else SINGLE_SCALE,
                                sample_style="choice", max_size=MAX_SIZE),
        L(T.RandomFlip)(horizontal=True),
    ]
    dataloader.evaluator.use_fast_impl = False

    optimizer = cfg.optimizer
    optimizer.lr, optimizer.momentum, optimizer.weight_decay = lr, 0.9, 1e-4
    optimizer.params.weight_decay_norm = 1e-4  # the authors decay norm layers too (detectron2's default: 0)
    lgd = dict(SHARED, schedule=dataclasses.asdict(SCHEDULES[schedule]), **method_settings())
    lgd["teacher_lr"] = lr
    if detector == "fcos" and depth == 50:
        lgd["use_context"] = False  # the authors' FCOS R50 configs have no context object (R101: on)
    if depth == 50:  # FGFI distils the R-101 of the same detector into an R-50 (the paper's FGFI rows)
        lgd["fgfi"]["teacher_overrides"] = list(BACKBONE_OVERRIDES["R_101"])
    else:  # LabelEnc's step 1 on the authors' R-50, whatever the step-2 backbone
        lgd["labelenc"]["step1_overrides"] = list(BACKBONE_OVERRIDES["R_50"])
    train.max_iter = SCHEDULES[schedule].max_iter
    train.amp.update(AMP)
    train.clip_gradients = dict(CLIP_GRADIENTS)
    return dataloader, lgd, model, optimizer, train
