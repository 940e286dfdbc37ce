"""Which implementation runs an op. Precedence: the op's `backend=` argument, then `use_backend(...)`, then
env `LGD_OPS_BACKEND`, then "auto".

"auto" chooses by measurement where the code runs, as torch.backends.cudnn.benchmark does, because no fixed
order is right on every device: the first call of an op for a (device, dtype, layout) times every backend that
can run there on that call's own inputs and keeps the fastest (auto_choices() lists the choices; a run records
them so that a resumed run uses the same ones; lgd-train's processes all take the main process's after the first
step). Under torch.compile and during CUDA graph capture nothing is timed: a recorded choice is used, else the
compiled kernels (cuda, then triton on CUDA tensors; cpu on CPU tensors). auto never picks triton for CPU tensors. "triton" needs triton and a GPU, or TRITON_INTERPRET=1 to run
CPU tensors through Triton's interpreter (slow: for tests).
"""
import contextlib
import contextvars
import functools
import importlib
import logging
import os
import threading
import time

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")

try:
    from . import _C  # noqa: F401  (loading it registers the torch.ops.lgd_ops kernels)

    HAS_EXTENSION = True
    EXTENSION_ERROR = None
except ImportError as exc:  # not built: the reference still works
    HAS_EXTENSION = False
    EXTENSION_ERROR = exc

_override = contextvars.ContextVar("lgd_ops_backend", default=None)
logger = logging.getLogger("lgd_ops")
_choices = {}  # "op/device/dtype/layout" -> the backend auto measured fastest there
_choices_lock = threading.Lock()
MARGIN = 0.05  # a backend later in the preference order must be this much faster to be chosen (timing noise)


def _has_kernel(key):
    return HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key("lgd_ops::box_pool", key)


def _triton_interpret():
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error():
    """None if triton imports, else the error (tried once, and only when triton could run)."""
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        return exc
    return None


def _has_triton():
    return (_triton_interpret() or torch.cuda.is_available()) and _triton_import_error() is None


def available_backends():
    """Backends that can run in this process, fastest-first per device ("cuda": compiled in and a GPU seen)."""
    names = ["reference"]
    if _has_kernel("CPU"):
        names.append("cpu")
    if _has_kernel("CUDA") and torch.cuda.is_available():
        names.append("cuda")
    if _has_triton():
        names.append("triton")
    return names


@contextlib.contextmanager
def use_backend(name):
    """Run the ops inside the block with backend `name` (unless an op call names its own)."""
    _check_name(name, "use_backend(name)")
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def _check_name(name, where):
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; expected 'auto' or one of {BACKENDS}")


def _requested(backend):
    """The backend asked for: the argument, else use_backend(), else LGD_OPS_BACKEND, else "auto"."""
    _check_name(backend, "backend")
    if backend == "auto":
        backend = _override.get() or os.environ.get("LGD_OPS_BACKEND", "auto") or "auto"
        _check_name(backend, "LGD_OPS_BACKEND")
    return backend


def _preferred(device_type, available):
    """auto's candidates on a device type, in the order used when nothing is measured."""
    order = ("cuda", "triton") if device_type == "cuda" else ("cpu",)
    return [name for name in order if name in available] + ["reference"]


@torch.compiler.assume_constant_result
def resolve(backend, device):
    """The backend that runs an op whose tensors live on `device`; a clear error if it can't.

    Under torch.compile it runs once while tracing and its answer is baked into the graph (it reads
    the dispatcher, the environment and use_backend(), none of which Dynamo can trace).
    """
    backend = _requested(backend)
    available = available_backends()
    if backend == "auto":
        backend = _preferred(device.type, available)[0]
        if backend == "triton":
            _load_triton_ops()
        return backend
    if backend not in available:
        why = f" (extension failed to load: {EXTENSION_ERROR})" if not HAS_EXTENSION else ""
        if backend == "cuda" and HAS_EXTENSION:
            why = " (no GPU)" if _has_kernel("CUDA") else " (built without CUDA)"
        if backend == "triton":
            error = _triton_import_error() if (_triton_interpret() or torch.cuda.is_available()) else None
            why = f" (triton failed to import: {error})" if error else " (it needs a GPU, or TRITON_INTERPRET=1)"
        raise ValueError(f"backend {backend!r} is not available{why}; available: {available}")
    if backend in ("cpu", "cuda") and device.type != backend:
        raise ValueError(f"backend {backend!r} cannot run tensors on device {device}")
    if backend == "triton":
        if device.type != "cuda" and not _triton_interpret():
            raise ValueError(f"backend 'triton' cannot run tensors on device {device} (CPU tensors need "
                             "TRITON_INTERPRET=1)")
        _load_triton_ops()
    return backend


def resolve_backend(backend="auto", device="cpu"):
    """The backend name an op with `backend=backend` would run for tensors on `device` (use_backend() and
    LGD_OPS_BACKEND applied; for "auto", its order before any measurement); ValueError if it cannot run there."""
    return resolve(backend, torch.device(device))


def choice_key(op, tensor, channels_last):
    """The key of auto's choice for `op` on tensors like `tensor`: op/device type/dtype/layout."""
    layout = "channels_last" if channels_last else "contiguous"
    return f"{op}/{tensor.device.type}/{str(tensor.dtype).removeprefix('torch.')}/{layout}"


def auto_choices():
    """auto's measured choices so far, {op/device/dtype/layout: backend}."""
    with _choices_lock:
        return dict(_choices)


def set_auto_choices(choices):
    """Replaces auto's choices (a resumed run restores its own); choices naming a backend that cannot run in this
    process are dropped, so auto measures those keys again."""
    available = set(available_backends())
    kept = {str(k): str(v) for k, v in dict(choices or {}).items() if v in available}
    with _choices_lock:
        _choices.clear()
        _choices.update(kept)


def _time(run, device, repeats=3):
    """Median seconds of run() after one warm-up call, without autograd."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            sync()
            start = time.perf_counter()
            run()
            sync()
            if i:
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def current_choice(op, backend="auto", tensor=None, channels_last=False):
    """The backend an op call on tensors like `tensor` would run now, without measuring anything: the requested
    one, else auto's recorded choice, else auto's order before measuring."""
    requested = _requested(backend)
    chosen = _choices.get(choice_key(op, tensor, channels_last)) if requested == "auto" else None
    if chosen is None:
        return resolve(requested, tensor.device)
    if chosen == "triton":
        _load_triton_ops()
    return chosen


def select(op, backend, tensor, channels_last, run):
    """The backend an op call runs: resolve()'s answer when one is requested (argument, use_backend, env), else
    auto's choice for choice_key(op, tensor, channels_last), timed on the first call with run(name) for each
    candidate (the call's own inputs). run(name) must compute the op with that backend and have no side
    effects."""
    requested = _requested(backend)
    if requested != "auto":
        return resolve(requested, tensor.device)
    key = choice_key(op, tensor, channels_last)
    if key in _choices:
        return current_choice(op, backend, tensor, channels_last)
    candidates = _preferred(tensor.device.type, available_backends())
    capturing = tensor.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if len(candidates) == 1 or torch.compiler.is_compiling() or capturing:
        return resolve("auto", tensor.device)
    if "triton" in candidates:
        _load_triton_ops()
    times = {name: _time(lambda: run(name), tensor.device) for name in candidates}
    chosen = candidates[0]
    for name in candidates[1:]:  # a later candidate must win by MARGIN
        if times[name] < times[chosen] * (1 - MARGIN):
            chosen = name
    with _choices_lock:
        chosen = _choices.setdefault(key, chosen)
    logger.info("lgd_ops auto: %s -> %s (%s)", key, chosen,
                ", ".join(f"{name} {t * 1e3:.3f} ms" for name, t in times.items()))
    return chosen


def _load_triton_ops():
    """Registers torch.ops.lgd_ops.*_triton (imported on first use: @triton.jit reads TRITON_INTERPRET)."""
    importlib.import_module("lgd_ops.triton")
