"""Backend selection: the op's backend= argument, then use_backend(), then LGD_OPS_BACKEND, then "auto"."""
import os
import threading
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lgd_ops
from lgd_ops import _backend
from conftest import backends_for, kernel_params

HAS_CPU_KERNELS = "cpu" in lgd_ops.available_backends()
needs_cpu_kernels = pytest.mark.skipif(not HAS_CPU_KERNELS, reason="lgd_ops._C not built")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


class RecordOps(TorchDispatchMode):
    """Names of the lgd_ops custom ops dispatched inside the block (none when the reference runs)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "lgd_ops":
            self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _calls(device="cpu", backend="auto"):
    """Runs the three ops with `backend` and returns the custom ops they dispatched."""
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0]], device=device)
    batch_idx = torch.zeros(1, dtype=torch.int64, device=device)
    features = torch.randn(1, 2, 4, 4, device=device)
    with RecordOps() as rec:
        lgd_ops.box_pool(features, boxes, batch_idx, (16, 16), backend=backend)
        lgd_ops.box_fill(torch.randn(1, 2, device=device), boxes, batch_idx, (16, 16), (1, 4, 4), backend=backend)
        lgd_ops.normalized_mse(features, torch.randn_like(features), backend=backend)
    return rec.names


COMPILED = ["box_pool", "box_fill", "normalized_mse"]


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("LGD_OPS_BACKEND", raising=False)


@pytest.fixture(autouse=True)
def fresh_choices():
    """Each test starts with no auto choice and leaves the process's choices as it found them."""
    saved = lgd_ops.auto_choices()
    lgd_ops.set_auto_choices({})
    yield
    lgd_ops.set_auto_choices(saved)


def compiled_choices():
    """auto's choices set to the compiled CPU kernels for what _calls() runs (float32 NCHW)."""
    lgd_ops.set_auto_choices({f"{op}/cpu/float32/contiguous": "cpu" for op in COMPILED})


class StandIns:
    """Stand-in backends for _backend.select: run(name) sleeps for that backend's time and counts the calls."""

    def __init__(self, **seconds):
        self.seconds, self.calls = seconds, []

    def __call__(self, name):
        self.calls.append(name)
        time.sleep(self.seconds[name])
        return name


@pytest.fixture
def two_backends(monkeypatch, no_env):
    monkeypatch.setattr(_backend, "available_backends", lambda: ["reference", "cpu"])


@pytest.mark.parametrize("slow", ["cpu", "reference"])
def test_auto_never_keeps_the_slow_backend(two_backends, slow):
    run = StandIns(**{"cpu": 0.0, "reference": 0.0, slow: 0.02})
    x = torch.zeros(2)
    chosen = _backend.select("toy", "auto", x, False, run)
    assert chosen != slow and lgd_ops.auto_choices() == {"toy/cpu/float32/contiguous": chosen}
    timed = len(run.calls)
    assert timed >= 2 * 2  # every candidate, a warm-up and repeats each
    assert _backend.select("toy", "auto", x, False, run) == chosen and len(run.calls) == timed  # timed once


def test_auto_keys_by_dtype_and_layout(two_backends):
    run = StandIns(cpu=0.0, reference=0.0)
    _backend.select("toy", "auto", torch.zeros(1, 2, 3, 3), False, run)
    _backend.select("toy", "auto", torch.zeros(1, 2, 3, 3), True, run)
    _backend.select("toy", "auto", torch.zeros(1, 2, 3, 3, dtype=torch.bfloat16), False, run)
    assert sorted(lgd_ops.auto_choices()) == ["toy/cpu/bfloat16/contiguous", "toy/cpu/float32/channels_last",
                                              "toy/cpu/float32/contiguous"]


def test_auto_choice_logged_once(two_backends):
    import logging

    class Lines(logging.Handler):  # on the logger itself: a command may have turned its propagation off
        def __init__(self):
            super().__init__(logging.INFO)
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    handler, logger = Lines(), logging.getLogger("lgd_ops")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        run = StandIns(cpu=0.0, reference=0.01)
        for _ in range(3):
            _backend.select("toy", "auto", torch.zeros(2), False, run)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = handler.lines
    assert len(lines) == 1 and "toy/cpu/float32/contiguous -> cpu" in lines[0] and "reference" in lines[0]


def test_pinned_backend_is_used_untimed(two_backends, monkeypatch):
    run = StandIns(cpu=0.0, reference=0.02)
    assert _backend.select("toy", "reference", torch.zeros(2), False, run) == "reference"
    with lgd_ops.use_backend("reference"):
        assert _backend.select("toy", "auto", torch.zeros(2), False, run) == "reference"
    monkeypatch.setenv("LGD_OPS_BACKEND", "reference")
    assert _backend.select("toy", "auto", torch.zeros(2), False, run) == "reference"
    assert run.calls == [] and lgd_ops.auto_choices() == {}


def test_restored_choices_are_used_untimed(two_backends):
    """What a resumed run does: the checkpoint's choices, set before any op runs, are used as they are; a choice
    of a backend this process cannot run is dropped (auto measures that key again)."""
    lgd_ops.set_auto_choices({"toy/cpu/float32/contiguous": "reference", "toy/cuda/float32/contiguous": "cuda"})
    assert lgd_ops.auto_choices() == {"toy/cpu/float32/contiguous": "reference"}
    run = StandIns(cpu=0.0, reference=0.02)
    assert _backend.select("toy", "auto", torch.zeros(2), False, run) == "reference" and run.calls == []


@needs_cpu_kernels
def test_auto_dispatches_the_measured_backend(no_env):
    _calls()  # the first calls measure
    expected = [op for op in COMPILED if lgd_ops.auto_choices()[f"{op}/cpu/float32/contiguous"] == "cpu"]
    assert _calls() == expected
    compiled_choices()
    assert _calls() == COMPILED
    lgd_ops.set_auto_choices({f"{op}/cpu/float32/contiguous": "reference" for op in COMPILED})
    assert _calls() == []


def test_available_backends():
    names = lgd_ops.available_backends()
    assert names[0] == "reference"
    assert set(names) <= set(_backend.BACKENDS)
    assert len(set(names)) == len(names)
    assert ("cpu" in names) == _backend.HAS_EXTENSION
    if "cuda" in names:
        assert torch._C._dispatch_has_kernel_for_dispatch_key("lgd_ops::box_pool", "CUDA")
    if not torch.cuda.is_available():  # only what can run here is listed
        assert "cuda" not in names and ("triton" in names) == (os.environ.get("TRITON_INTERPRET") == "1")


def test_compiled_cuda_without_gpu_names_the_reason(no_env):
    if torch.cuda.is_available() or not _backend._has_kernel("CUDA"):
        pytest.skip("needs the CUDA kernels compiled in and no GPU")
    with pytest.raises(ValueError, match=r"backend 'cuda' is not available \(no GPU\)"):
        _run_one("box_pool", "cuda")


def test_backends_for_helper():
    assert "reference" not in backends_for("cpu")
    assert ("cpu" in backends_for("cpu")) == HAS_CPU_KERNELS
    assert "cpu" not in backends_for("cuda") and "cuda" not in backends_for("cpu")
    assert all(p.values[0] in ("cpu", "cuda") for p in kernel_params())


@needs_cpu_kernels
def test_auto_prefers_compiled_kernels_before_measuring(no_env):
    assert _backend.resolve("auto", torch.device("cpu")) == "cpu"


def test_explicit_reference_runs_no_custom_op(no_env):
    assert _backend.resolve("reference", torch.device("cpu")) == "reference"
    assert _calls(backend="reference") == []


@needs_cpu_kernels
def test_explicit_cpu_backend(no_env):
    assert _calls(backend="cpu") == COMPILED


def test_use_backend_context(no_env):
    with lgd_ops.use_backend("reference"):
        assert _calls() == []
        assert _backend.resolve("auto", torch.device("cpu")) == "reference"
    assert _backend.resolve("auto", torch.device("cpu")) == ("cpu" if HAS_CPU_KERNELS else "reference")


@needs_cpu_kernels
def test_argument_beats_use_backend_and_nesting_restores(no_env):
    compiled_choices()
    with lgd_ops.use_backend("reference"):
        assert _calls(backend="cpu") == COMPILED
        with lgd_ops.use_backend("cpu"):
            assert _calls() == COMPILED
        assert _calls() == []
    assert _calls() == COMPILED


def test_use_backend_restored_after_exception(no_env):
    with pytest.raises(KeyError):
        with lgd_ops.use_backend("reference"):
            raise KeyError("boom")
    assert _backend._override.get() is None


@needs_cpu_kernels
def test_use_backend_is_local_to_its_thread(no_env):
    seen = []
    with lgd_ops.use_backend("reference"):
        t = threading.Thread(target=lambda: seen.append(_backend.resolve("auto", torch.device("cpu"))))
        t.start()
        t.join()
        assert _calls() == []
    assert seen == ["cpu"]


@pytest.mark.parametrize("name", ["nope", "CPU", "", None, "gpu"])
def test_use_backend_unknown_name(name):
    with pytest.raises(ValueError, match=r"use_backend\(name\).*unknown backend"):
        with lgd_ops.use_backend(name):
            pass


def test_env_var(monkeypatch):
    monkeypatch.setenv("LGD_OPS_BACKEND", "reference")
    assert _calls() == []
    if HAS_CPU_KERNELS:
        assert _calls(backend="cpu") == COMPILED  # the argument beats the env var
        with lgd_ops.use_backend("cpu"):  # and so does use_backend
            assert _calls() == COMPILED
        monkeypatch.setenv("LGD_OPS_BACKEND", "cpu")
        assert _calls() == COMPILED
        with lgd_ops.use_backend("reference"):
            assert _calls() == []


@pytest.mark.parametrize("value", ["", "auto"])
def test_env_var_auto(monkeypatch, value):
    monkeypatch.setenv("LGD_OPS_BACKEND", value)
    assert _backend.resolve("auto", torch.device("cpu")) == ("cpu" if HAS_CPU_KERNELS else "reference")


def test_env_var_unknown(monkeypatch):
    monkeypatch.setenv("LGD_OPS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="LGD_OPS_BACKEND.*unknown backend 'fastest'"):
        _calls()
    # an explicit argument does not read the env var
    assert _calls(backend="reference") == []


@pytest.mark.parametrize("op", ["box_pool", "box_fill", "normalized_mse"])
def test_unknown_backend_argument(no_env, op):
    with pytest.raises(ValueError, match="backend: unknown backend 'fast'"):
        _run_one(op, "fast")


@pytest.mark.parametrize("op", ["box_pool", "box_fill", "normalized_mse"])
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_unavailable_backend(no_env, op, name):
    if name in lgd_ops.available_backends():
        pytest.skip(f"{name} is available here")
    with pytest.raises(ValueError, match=f"backend '{name}' is not available.*available: "):
        _run_one(op, name)


def test_unavailable_backend_via_use_backend_and_env(monkeypatch):
    if "cuda" in lgd_ops.available_backends():
        pytest.skip("cuda is available here")
    with lgd_ops.use_backend("cuda"):  # a known name: accepted here, refused when an op runs
        with pytest.raises(ValueError, match="backend 'cuda' is not available"):
            _calls()
    monkeypatch.setenv("LGD_OPS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="backend 'cuda' is not available"):
        _calls()


def test_device_mismatch_without_gpu(monkeypatch):
    """A compiled backend bound to another device type is refused (simulated: pretend cuda kernels exist)."""
    monkeypatch.setattr(_backend, "available_backends", lambda: ["reference", "cpu", "cuda"])
    with pytest.raises(ValueError, match="backend 'cuda' cannot run tensors on device cpu"):
        _backend.resolve("cuda", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend 'cpu' cannot run tensors on device cuda"):
        _backend.resolve("cpu", torch.device("cuda", 0))
    assert _backend.resolve("auto", torch.device("cuda", 0)) == "cuda"
    assert _backend.resolve("auto", torch.device("cpu")) == "cpu"
    monkeypatch.setattr(_backend, "available_backends", lambda: ["reference"])
    assert _backend.resolve("auto", torch.device("cuda", 0)) == "reference"


@needs_cuda
@pytest.mark.parametrize("op", ["box_pool", "box_fill", "normalized_mse"])
def test_device_mismatch_on_gpu(no_env, op):
    if HAS_CPU_KERNELS:
        with pytest.raises(ValueError, match="backend 'cpu' cannot run tensors on device cuda"):
            _run_one(op, "cpu", device="cuda")
    if "cuda" in lgd_ops.available_backends():
        with pytest.raises(ValueError, match="backend 'cuda' cannot run tensors on device cpu"):
            _run_one(op, "cuda", device="cpu")
        assert _calls(device="cuda") == COMPILED


def _run_one(op, backend, device="cpu"):
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0]], device=device)
    batch_idx = torch.zeros(1, dtype=torch.int64, device=device)
    features = torch.randn(1, 2, 4, 4, device=device)
    if op == "box_pool":
        return lgd_ops.box_pool(features, boxes, batch_idx, (16, 16), backend=backend)
    if op == "box_fill":
        return lgd_ops.box_fill(torch.randn(1, 2, device=device), boxes, batch_idx, (16, 16), (1, 4, 4),
                                backend=backend)
    return lgd_ops.normalized_mse(features, torch.randn_like(features), backend=backend)
