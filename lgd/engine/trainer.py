"""The fast path (train.amp: enabled, precision, channels_last) and detectron2's AMPTrainer on any device.

Why: LGD's extra cost is memory traffic and convolutions, which bf16 and channels_last halve where the device has
them, while what needs fp32 (weights, optimizer state, checkpoints, losses) stays fp32. resolve_fast_path decides
what runs from what the device supports; README.md ("Training LGD on your data") and docs/library.md show it used.
"""
import dataclasses
import logging
import time
from typing import Optional

import torch
from detectron2.engine import AMPTrainer as DetectronAMPTrainer

__all__ = ["AMPTrainer", "FastPath", "PRECISIONS", "cpu_bf16_flags", "cpu_supports_bf16", "resolve_fast_path",
           "use_channels_last"]

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # train.amp.precision's values
_NAMES = {v: k for k, v in PRECISIONS.items()}


def cpu_bf16_flags():
    """The processor's bf16 flags found in /proc/cpuinfo (amx_bf16, avx512_bf16), [] where there are none."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags]


def cpu_supports_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (its own check: avx512_bf16 / AMX, or avx512 core)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return bool(cpu_bf16_flags())


@dataclasses.dataclass(frozen=True)
class FastPath:
    """What a run uses: autocast dtype (None: fp32, no autocast), channels_last, GradScaler, and why.
    fallback: the requested precision is not available on the device and another one runs (worth a warning)."""

    device_type: str
    dtype: Optional[torch.dtype]
    channels_last: bool
    note: str = ""
    fallback: bool = False

    @property
    def grad_scaler(self) -> bool:
        return self.dtype == torch.float16

    @property
    def precision(self) -> str:
        return "fp32" if self.dtype is None else _NAMES[self.dtype]

    def describe(self) -> str:
        what = "fp32" if self.dtype is None else f"{self.precision} autocast"
        parts = [f"{what} on {self.device_type}", "channels_last" if self.channels_last else "NCHW"]
        if self.dtype is not None:
            parts.append("GradScaler" if self.grad_scaler else "no GradScaler")
        return ", ".join(parts) + (f" ({self.note})" if self.note else "")


def resolve_fast_path(amp_enabled, precision="bf16", channels_last=None, device="cpu") -> FastPath:
    """FastPath of train.amp.enabled / precision / channels_last on `device`.

    What runs, from what the device supports:
      train.amp.enabled=False      fp32 (train.amp.precision is not read), NCHW unless
                                   train.amp.channels_last=True.
      train.amp.enabled=True       autocast in train.amp.precision: "bf16" (default) or "fp16"; "fp32" runs fp32.
          CPU:  bf16 where the processor has native bf16 (oneDNN's check: avx512_bf16 / AMX; the flags found are
                named); otherwise fp32, with a warning. fp16 on CPU runs bf16 (CPUs have no fast fp16 path; bf16
                needs no loss scaling) or fp32.
          CUDA: bf16 where torch.cuda.is_bf16_supported(), else fp16 with a GradScaler (warning); fp16 always
                with a GradScaler.
      train.amp.channels_last: None (default) = on exactly when autocast runs (the fast path), True / False
        forces it.
        The model's 4-D weights and the backbone's input image batch are channels_last; the teacher's maps follow
        (its convs keep the layout, lgd_ops.box_fill writes the layout of the model).
    An invalid value is a ValueError naming the key and the valid values.

    What stays fp32: the parameters, gradients, optimizer state and so the checkpoints (autocast casts on the
    fly), the detector's losses (lgd.modeling.detector_drivers: the head's predictions are cast to fp32 and the
    focal / box-regression losses run outside autocast), the distillation loss's value and InstanceNorm moments
    (lgd_ops.normalized_mse accumulates in fp32 for fp16/bf16 maps), and the sum of the losses. GroupNorm /
    LayerNorm run in bf16 under CPU autocast (their kernels accumulate the moments in fp32) and in fp32 under
    CUDA autocast.
    """
    if not isinstance(amp_enabled, bool):
        raise ValueError(f"train.amp.enabled must be True or False, got {amp_enabled!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"train.amp.precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if channels_last not in (None, True, False):
        raise ValueError(f"train.amp.channels_last must be None (follow train.amp.enabled), True or False, "
                         f"got {channels_last!r}")
    device_type = torch.device(device).type
    dtype, note, fallback = None, "", False
    if amp_enabled and precision != "fp32":
        if device_type == "cuda":
            if precision == "bf16" and not torch.cuda.is_bf16_supported():
                dtype, note, fallback = torch.float16, "this GPU has no bf16: fp16 with a GradScaler", True
            else:
                dtype = PRECISIONS[precision]
        elif device_type == "cpu":
            flags = cpu_bf16_flags()
            if cpu_supports_bf16():
                dtype = torch.bfloat16
                note = "CPU " + ("/".join(flags) if flags else "oneDNN bf16")
                if precision == "fp16":
                    note += "; fp16 requested: bf16 used on CPU"
            else:
                note = f"train.amp.precision={precision}: this CPU has no native bf16 (no avx512_bf16/AMX): fp32"
                fallback = True
        else:
            note, fallback = f"no autocast on {device_type}: fp32", True
    elif amp_enabled:
        note = "train.amp.precision=fp32"
    use_cl = (dtype is not None) if channels_last is None else channels_last
    return FastPath(device_type, dtype, use_cl, note, fallback)


def _channels_last_input(module, args):
    x = args[0]
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return (x.contiguous(memory_format=torch.channels_last),) + tuple(args[1:])
    return None


def use_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """model in channels_last: its 4-D weights, and the image batch entering its detector's backbone
    (a forward pre-hook on `detector.backbone`, or on `model.backbone` for a plain detector), except the
    submodules a wrapper names in `nchw_modules` (kept contiguous: LabelEnc's label network). Returns model."""
    model.to(memory_format=torch.channels_last)
    for name in getattr(model, "nchw_modules", ()):
        getattr(model, name).to(memory_format=torch.contiguous_format)
    detector = getattr(model, "detector", model)
    backbone = getattr(detector, "backbone", None)
    if backbone is not None and not getattr(backbone, "_lgd_channels_last", False):
        backbone.register_forward_pre_hook(_channels_last_input)
        backbone._lgd_channels_last = True
    return model


class AMPTrainer(DetectronAMPTrainer):
    """detectron2's AMPTrainer with autocast on any device and dtype. grad_scaler defaults to
    torch.amp.GradScaler(device_type), enabled only for float16 (dtype None on CUDA: float16).

    It differs from detectron2 v0.6's (CUDA and float16 only, always a GradScaler) in: autocast on any
    device with any dtype; a GradScaler only for float16 (bfloat16 has fp32's range: its scaler is disabled, so
    no unscale pass and no skipped steps); the losses summed in fp32 outside autocast; and trainer states that
    load across precisions: a checkpoint of a SimpleTrainer (fp32 run) or of a bf16 run (empty scaler state)
    starts a fresh GradScaler, a float16 run's scaler state is ignored by a bf16 run. Gradient clipping happens
    inside the optimizer's step (lgd.engine.optim), after GradScaler.step has unscaled the gradients.
    """

    def __init__(self, model, data_loader, optimizer, grad_scaler=None, device_type: str = "cuda",
                 dtype: Optional[torch.dtype] = None):
        if dtype is None:
            dtype = torch.get_autocast_dtype(device_type)
        if grad_scaler is None:
            grad_scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
        super().__init__(model, data_loader, optimizer, grad_scaler)
        self.device_type, self.dtype = device_type, dtype

    def run_step(self):
        assert self.model.training, "[AMPTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast(self.device_type, dtype=self.dtype):
            loss_dict = self.model(data)
        losses = sum(v.float() for v in loss_dict.values())
        self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        self._write_metrics(loss_dict, data_time)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()

    def load_state_dict(self, state_dict):
        """As detectron2's, and a state without a usable scaler state (an fp32 SimpleTrainer's or a bf16
        run's, for a float16 run) keeps the fresh GradScaler."""
        scaler_state = state_dict.get("grad_scaler") or {}
        super(DetectronAMPTrainer, self).load_state_dict(state_dict)
        if self.grad_scaler.is_enabled() and scaler_state:
            self.grad_scaler.load_state_dict(scaler_state)
        elif self.grad_scaler.is_enabled():
            logger.info("AMPTrainer: the checkpoint has no GradScaler state (an fp32 or bf16 run): fresh scaler")
