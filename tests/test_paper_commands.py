"""docs/paper.md: every lgd-train command on the page parses, loads its config with its overrides, builds its
model (stages included: each stage's model is built and its weights saved where the run reads them) and trains
one iteration on fake data, on the CPU. Each distinct command is built once, at its full architecture, on
64 x 96 images. Also: lgd.schedule.final_nondistill_iters (the authors' POST_NONDISTILL_ITERS) in the schedule,
its hooks and the FCOS DCN v2 configs."""
import os
import re
import shlex

import pytest

pytest.importorskip("detectron2")

import torch
from detectron2.structures import BitMasks
from detectron2.utils.events import EventStorage

from conftest import detectron2_input
from lgd.config import load_config
from lgd.engine.hooks import DistillationSchedule, build_distill_hooks
from lgd.engine.schedule import PAPER_SCHEDULES, LGDSchedule
from lgd.methods import build_method, stage_checkpoint
from lgd.runner import build_model, build_optimizer, build_schedule
from lgd.runner.train import method_stages
from lgd.tools.train_net import build_parser, setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "paper.md")
IMAGE = (64, 96)
# the ablation switches of the paper's Tables 4-6 that another branch adds (lgd.use_context exists already)
ABLATION_KEYS = ("lgd.label_encoder", "lgd.interaction", "lgd.use_objects", "lgd.instructive_head")


def page_commands():
    """Every `lgd-train ...` command written on docs/paper.md, in order, without repeats."""
    with open(PAGE) as f:
        text = f.read()
    return list(dict.fromkeys(re.findall(r"`(lgd-train [^`]+)`", text)))


COMMANDS = page_commands()


def test_the_page_has_commands_for_every_table():
    with open(PAGE) as f:
        text = f.read()
    for table in [f"## Table {n}:" for n in range(1, 10)] + ["## Table: instance segmentation"]:
        assert table in text, table
    assert len(COMMANDS) >= 40
    for command in COMMANDS:
        assert "--num-gpus 8" in command and "--config-file lgd/configs/" in command, command


def unknown_ablation_keys(args):
    """The ABLATION_KEYS a command overrides that its config file does not define yet."""
    keys = [o.split("=", 1)[0] for o in args.opts if o.split("=", 1)[0] in ABLATION_KEYS]
    if not keys:
        return []
    lgd = load_config(os.path.join(ROOT, args.config_file)).lgd
    return [k for k in keys if k.split(".", 1)[1] not in lgd]


def fake_batch(cfg):
    """Two training inputs with 2 and 1 objects (boxes as masks too, for Mask R-CNN)."""
    num_classes = next(node.num_classes for node in (cfg.model, cfg.model.get("head"), cfg.model.get("roi_heads"))
                       if node is not None and "num_classes" in node)
    batch = []
    for seed, boxes in enumerate(([[4, 6, 40, 50], [50, 10, 90, 60]], [[20, 20, 70, 58]])):
        item = detectron2_input(boxes, [i % num_classes for i in range(len(boxes))], seed, IMAGE)
        masks = torch.zeros(len(boxes), *IMAGE, dtype=torch.bool)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes):
            mask[y0:y1, x0:x1] = True
        item["instances"].gt_masks = BitMasks(masks)
        batch.append(item)
    return batch


def build_run(cfg, method):
    """The run's model as lgd-train builds it, after building each stage's (recursively) and saving its weights
    as the stage's final checkpoint."""
    for stage, stage_cfg in method_stages(cfg, method):
        stage_cfg.train.device = "cpu"
        path = stage_checkpoint(cfg.train.output_dir, stage.name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({"model": build_run(stage_cfg, build_method(stage_cfg)).state_dict()}, path)
    build_schedule(cfg)
    return build_model(cfg, method)


@pytest.mark.parametrize("command", COMMANDS)
def test_command_builds_and_trains_one_iteration(command, tmp_path):
    argv = shlex.split(command)
    assert argv[0] == "lgd-train"
    args = build_parser().parse_args(argv[1:])
    assert args.num_gpus == 8
    missing = unknown_ablation_keys(args)
    if missing:
        pytest.skip(f"{', '.join(missing)} not yet known to {args.config_file} (the ablation switches' branch)")
    args.config_file = os.path.join(ROOT, args.config_file)
    cfg = setup(args)
    cfg.train.device, cfg.train.output_dir = "cpu", str(tmp_path / "run")
    method = build_method(cfg)
    model = build_run(cfg, method)
    optimizer = build_optimizer(cfg, model, method)
    model.train()
    with EventStorage(0):
        losses = model(fake_batch(cfg))
    total = sum(losses.values())
    assert torch.isfinite(total), losses
    total.backward()
    optimizer.step()


# ------------------------------------------------------------------ the end of distillation (final_nondistill_iters)

def test_final_nondistill_iters_is_scaled_and_ends_distillation():
    schedule = LGDSchedule(180000, (120000, 160000), distill_start_iter=30000, backbone_freeze_iters=20000,
                           final_nondistill_iters=50000)
    short = schedule.scaled(1800)
    assert (short.distill_start_iter, short.final_nondistill_iters) == (300, 500)
    distill, _ = build_distill_hooks(short)
    assert (distill.start_iter, distill.end_iter) == (300, 1300)
    assert build_distill_hooks(PAPER_SCHEDULES["2x"])[0].end_iter is None  # 0: distillation to the end
    with pytest.raises(ValueError, match="final_nondistill_iters"):
        LGDSchedule(10, (6,), 3, 1, final_nondistill_iters=-1)


def test_distillation_hook_is_on_inside_its_window_only():
    class Model:
        distill_enabled = None

    trainer = type("T", (), {"model": Model(), "storage": type("S", (), {"put_scalar": lambda *a, **k: None})()})()
    hook = DistillationSchedule(3, 7)
    hook.trainer = trainer
    for it in (0, 2, 3, 6, 7, 9, 4):  # any order, as after a resume
        trainer.iter = it
        hook.before_step()
        assert trainer.model.distill_enabled is (3 <= it < 7), it


@pytest.mark.parametrize("name, final", [("fcos_X_101_32x8d_DCNv2_FPN_2x_ms_lgd.py", 50000),
                                         ("fcos_R_101_DCNv2_FPN_2x_ms_lgd.py", 50000),
                                         ("retinanet_R_101_DCNv2_FPN_2x_ms_lgd.py", 0),
                                         ("fcos_R_50_FPN_2x_ms_lgd.py", 0)])
def test_configs_end_distillation_as_the_authors(name, final):
    cfg = load_config(os.path.join(ROOT, "lgd", "configs", name), ["train.max_iter=1800"])
    schedule = build_schedule(cfg)
    assert cfg.lgd.schedule.final_nondistill_iters == final
    assert schedule.final_nondistill_iters == final // 100  # scaled with the run, as the other counts


# ------------------------------------------------------------------------------------- Pascal VOC and CrowdHuman

def test_voc_config_trains_on_07_12_and_evaluates_on_07_test():
    from detectron2.evaluation import PascalVOCDetectionEvaluator

    cfg = load_config(os.path.join(ROOT, "lgd", "configs", "faster_rcnn_R_50_FPN_voc_lgd.py"))
    assert list(cfg.dataloader.train.dataset.names) == ["voc_2007_trainval", "voc_2012_trainval"]
    assert cfg.dataloader.test.dataset.names == "voc_2007_test" and cfg.model.roi_heads.num_classes == 20
    assert cfg.dataloader.evaluator._target_ is PascalVOCDetectionEvaluator
    assert (cfg.train.max_iter, build_schedule(cfg).steps) == (18000, (12000, 16000))
    retinanet = load_config(os.path.join(ROOT, "lgd", "configs", "retinanet_R_50_FPN_voc_lgd.py"))
    assert retinanet.model.num_classes == 20


def test_crowdhuman_config_registers_the_splits_it_finds(tmp_path, monkeypatch):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from PIL import Image

    from lgd.evaluation import MissRateEvaluator

    root = tmp_path / "CrowdHuman"
    (root / "Images").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(root / "Images" / "a.jpg")
    line = '{"ID": "a", "gtboxes": [{"tag": "person", "fbox": [1, 2, 10, 20]}]}\n'
    (root / "annotation_val.odgt").write_text(line)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    try:
        cfg = load_config(os.path.join(ROOT, "lgd", "configs", "fcos_R_50_FPN_crowdhuman_lgd.py"))
        assert (cfg.dataloader.train.dataset.names, cfg.dataloader.test.dataset.names) == ("crowdhuman_train",
                                                                                           "crowdhuman_val")
        assert cfg.dataloader.evaluator._target_ is MissRateEvaluator and cfg.model.num_classes == 1
        assert "crowdhuman_val" in DatasetCatalog.list() and "crowdhuman_train" not in DatasetCatalog.list()
        assert DatasetCatalog.get("crowdhuman_val")[0]["annotations"][0]["bbox"] == [1.0, 2.0, 10.0, 20.0]
    finally:  # the next registration of the name (another test, another root) starts clean
        if "crowdhuman_val" in DatasetCatalog.list():
            DatasetCatalog.remove("crowdhuman_val")
            MetadataCatalog.remove("crowdhuman_val")
