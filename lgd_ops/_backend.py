"""Which implementation runs an op: the compiled extension if it loaded, else the reference.

Precedence: the op's `backend=` argument, then `use_backend(...)`, then env `LGD_OPS_BACKEND`,
then "auto" (the fastest backend available for the tensors' device: cuda > triton > reference on
CUDA tensors, cpu > reference on CPU tensors; auto never picks triton for CPU tensors).
"triton" (lgd_ops/triton/) needs triton and a GPU, or TRITON_INTERPRET=1 to run CPU tensors
through Triton's interpreter (slow: for tests).
"""
import contextlib
import contextvars
import functools
import importlib
import os

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


@torch.compiler.assume_constant_result
def resolve(backend, device):
    """The backend that runs an op whose tensors live on `device`; a clear error if it can't.

    Under torch.compile it runs once while tracing and its answer is baked into the graph (it reads
    the dispatcher, the environment and use_backend(), none of which Dynamo can trace).
    """
    _check_name(backend, "backend")
    if backend == "auto":
        backend = _override.get() or os.environ.get("LGD_OPS_BACKEND", "auto") or "auto"
        _check_name(backend, "LGD_OPS_BACKEND")
    available = available_backends()
    if backend == "auto":
        preferred = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
        backend = next((name for name in preferred if name in available), "reference")
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
    """The backend name an op with `backend=backend` would run for tensors on `device` ("auto", the
    use_backend() context and LGD_OPS_BACKEND applied); ValueError if that backend cannot run there."""
    return resolve(backend, torch.device(device))


def _load_triton_ops():
    """Registers torch.ops.lgd_ops.*_triton (imported on first use: @triton.jit reads TRITON_INTERPRET)."""
    importlib.import_module("lgd_ops.triton")
