"""The fast path (lgd.engine.trainer): train.amp.enabled / lgd-train --fast, train.amp.precision and
train.amp.channels_last.

What the switch resolves to on each device (the hardware checks monkeypatched), the trainer, dtype and memory
format lgd-train builds from it, a few bf16 + channels_last steps of a tiny LGD RetinaNet (finite fp32
losses, fp32 weights, channels_last maps through the teacher), checkpoints that load across precisions
(lgd-train runs: fast -> fp32 resume and back; GradScaler states), and one-line errors for bad values.
"""
import itertools
import os
import re

import pytest

pytest.importorskip("detectron2")

import torch
from detectron2.engine import SimpleTrainer
from detectron2.engine.train_loop import HookBase

from lgd.engine import trainer as fast_mod
from lgd.engine.optim import build_lgd_optimizer
from lgd.engine.trainer import AMPTrainer, resolve_fast_path, use_channels_last
from lgd import runner
from lgd.config import load_config
from lgd.methods import build_method
from lgd.tools import train_net
from test_lgd_distiller import make_batch, make_distiller

CL = torch.channels_last


@pytest.fixture
def bf16_cpu(monkeypatch):
    monkeypatch.setattr(fast_mod, "cpu_supports_bf16", lambda: True)


def test_switch_off_is_fp32_nchw():
    fast = resolve_fast_path(False, "bf16", None, "cpu")
    assert fast.dtype is None and not fast.channels_last and not fast.grad_scaler
    assert resolve_fast_path(False, "bf16", True, "cpu").channels_last  # forced on for an fp32 run


def test_cpu_bf16_when_supported_else_fp32(bf16_cpu, monkeypatch):
    fast = resolve_fast_path(True, "bf16", None, "cpu")
    assert (fast.dtype, fast.channels_last, fast.grad_scaler) == (torch.bfloat16, True, False)
    assert "bf16 autocast" in fast.describe() and "channels_last" in fast.describe()
    assert resolve_fast_path(True, "fp16", None, "cpu").dtype == torch.bfloat16  # no fp16 path on CPU
    assert resolve_fast_path(True, "fp32", None, "cpu").dtype is None
    assert not resolve_fast_path(True, "bf16", False, "cpu").channels_last
    monkeypatch.setattr(fast_mod, "cpu_supports_bf16", lambda: False)
    fallback = resolve_fast_path(True, "bf16", None, "cpu")
    assert fallback.dtype is None and not fallback.channels_last and "no native bf16" in fallback.note
    assert fallback.fallback and not resolve_fast_path(True, "fp32", None, "cpu").fallback


def test_cuda_bf16_or_fp16_with_grad_scaler(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_fast_path(True, "bf16", None, "cuda").dtype == torch.bfloat16
    fp16 = resolve_fast_path(True, "fp16", None, "cuda")
    assert fp16.dtype == torch.float16 and fp16.grad_scaler
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    fallback = resolve_fast_path(True, "bf16", None, "cuda")
    assert fallback.dtype == torch.float16 and fallback.grad_scaler and "no bf16" in fallback.note
    assert fallback.fallback


@pytest.mark.parametrize("kwargs,message", [
    (dict(precision="fp8"), "train.amp.precision must be one of ['fp32', 'bf16', 'fp16'], got 'fp8'"),
    (dict(channels_last="yes"), "train.amp.channels_last must be None"),
    (dict(amp_enabled="on"), "train.amp.enabled must be True or False"),
])
def test_bad_values_name_the_key(kwargs, message):
    args = dict(dict(amp_enabled=True, precision="bf16", channels_last=None, device="cpu"), **kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_fast_path(**args)


def _tiny_cfg(*overrides):
    from conftest import shrink_retinanet_config

    cfg = load_config(os.path.join(train_net.__file__.rsplit("/lgd/", 1)[0], "lgd", "configs",
                                             "retinanet_R_50_FPN_1x_lgd.py"), ["train.device=cpu", *overrides])
    shrink_retinanet_config(cfg.model, num_classes=3)
    return cfg


def test_config_builds_the_right_trainer_dtype_and_format(bf16_cpu):
    fast_cfg = _tiny_cfg("train.amp.enabled=True")
    model = runner.build_model(fast_cfg, build_method(fast_cfg, backend="reference"))
    conv = model.detector.backbone.bottom_up.stem.conv1.weight
    assert conv.is_contiguous(memory_format=CL) and not conv.is_contiguous() and conv.dtype == torch.float32
    trainer = runner.build_trainer(model, iter([]), build_lgd_optimizer(model, lr=0.0),
                                       runner.fast_path(fast_cfg, "cpu"))
    assert isinstance(trainer, AMPTrainer) and trainer.dtype == torch.bfloat16
    assert not trainer.grad_scaler.is_enabled()

    fp32_cfg = _tiny_cfg()
    model = runner.build_model(fp32_cfg, build_method(fp32_cfg, backend="reference"))
    assert model.detector.backbone.bottom_up.stem.conv1.weight.is_contiguous()
    trainer = runner.build_trainer(model, iter([]), build_lgd_optimizer(model, lr=0.0),
                                       runner.fast_path(fp32_cfg, "cpu"))
    assert type(trainer) is SimpleTrainer


class _Trace(HookBase):
    def __init__(self):
        self.losses = []

    def after_step(self):
        self.losses.append({k: v.latest() for k, v in self.trainer.storage.histories().items()
                            if k.startswith("loss")})


def test_fast_steps_finite_fp32_losses_and_weights_channels_last_maps():
    model = use_channels_last(make_distiller(backend="auto"))
    seen = {}
    model.teacher.register_forward_hook(lambda m, i, out: seen.update(teacher=out))
    model.detector.backbone.register_forward_pre_hook(lambda m, args: seen.update(image=args[0]))
    trainer = AMPTrainer(model, itertools.repeat(make_batch()), build_lgd_optimizer(model, lr=0.01),
                         device_type="cpu", dtype=torch.bfloat16)
    trace = _Trace()
    trainer.register_hooks([trace])
    dtypes = []
    forward = model.forward
    model.forward = lambda data: (lambda out: dtypes.append({v.dtype for v in out.values()}) or out)(forward(data))
    trainer.train(0, 3)
    assert len(trace.losses) == 3 and all(torch.isfinite(torch.tensor(list(x.values()))).all() for x in trace.losses)
    assert "loss_distill" in trace.losses[-1] and "loss_cls_tea" in trace.losses[-1]
    assert dtypes == [{torch.float32}] * 3  # every loss fp32 under autocast
    assert seen["image"].is_contiguous(memory_format=CL)
    maps = list(seen["teacher"].values())
    assert all(x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=CL) for x in maps)
    state = model.state_dict()
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}


def test_grad_scaler_states_load_across_precisions():
    model = make_distiller()
    fp16 = AMPTrainer(model, iter([]), build_lgd_optimizer(model, lr=0.01), device_type="cpu", dtype=torch.float16)
    assert fp16.grad_scaler.is_enabled()
    fp32_state = SimpleTrainer(model, iter([]), build_lgd_optimizer(model, lr=0.01)).state_dict()
    fp16.load_state_dict(dict(fp32_state, iteration=5))  # no grad_scaler key: a fresh scaler
    assert fp16.iter == 5
    bf16 = AMPTrainer(model, iter([]), build_lgd_optimizer(model, lr=0.01), device_type="cpu", dtype=torch.bfloat16)
    fp16.load_state_dict(bf16.state_dict())  # a bf16 run's (disabled, empty) scaler state
    bf16.load_state_dict(fp16.state_dict())  # an fp16 run's scaler state: ignored by bf16
    assert not bf16.grad_scaler.is_enabled()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from test_lgd_train_net import make_setup

    return make_setup(tmp_path_factory.mktemp("fast_path"))


@pytest.mark.parametrize("first,second", [(["--fast"], []), ([], ["--fast"])], ids=["fast_then_fp32", "fp32_then_fast"])
def test_checkpoints_are_fp32_and_resume_across_modes(setup, first, second, monkeypatch):
    from test_lgd_train_net import argv, read_metrics

    monkeypatch.setattr(fast_mod, "cpu_supports_bf16", lambda: True)
    root, cfg_file, ann, images = setup
    out = str(root / ("fast_first" if first else "fp32_first"))
    train_net.run(argv(cfg_file, ann, images, out, *first, max_iter=2))
    state = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)
    assert {v.dtype for v in state["model"].values() if v.is_floating_point()} == {torch.float32}
    train_net.run(argv(cfg_file, ann, images, out, *second, "--resume", max_iter=4))
    iters = [m["iteration"] for m in read_metrics(out) if "total_loss" in m]
    assert iters[-1] == 3 and all(torch.isfinite(torch.tensor(m["total_loss"])) for m in read_metrics(out)
                                  if "total_loss" in m)


def test_lgd_train_help_and_bad_precision(setup, capsys):
    with pytest.raises(SystemExit):
        train_net.build_parser().parse_args(["--help"])
    assert "--fast" in capsys.readouterr().out
    from test_lgd_train_net import argv

    root, cfg_file, ann, images = setup
    code = train_net.main(argv(cfg_file, ann, images, str(root / "bad"), "train.amp.precision=fp8"))
    assert code == 2
    assert "train.amp.precision must be one of ['fp32', 'bf16', 'fp16'], got 'fp8'" in capsys.readouterr().err
