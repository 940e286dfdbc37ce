"""Which implementation runs an op: the compiled extension if it loaded, else the reference.

Precedence: the op's `backend=` argument, then `use_backend(...)`, then env `LGD_OPS_BACKEND`,
then "auto" (the fastest backend available for the tensors' device).
"""
import contextlib
import contextvars
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


def available_backends():
    """Backends usable in this process, fastest-first per device ("cuda" means compiled in)."""
    names = ["reference"]
    if _has_kernel("CPU"):
        names.append("cpu")
    if _has_kernel("CUDA"):
        names.append("cuda")
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


def resolve(backend, device):
    """The backend that runs an op whose tensors live on `device`; a clear error if it can't."""
    _check_name(backend, "backend")
    if backend == "auto":
        backend = _override.get() or os.environ.get("LGD_OPS_BACKEND", "auto") or "auto"
        _check_name(backend, "LGD_OPS_BACKEND")
    available = available_backends()
    if backend == "auto":
        preferred = "cuda" if device.type == "cuda" else "cpu"
        return preferred if preferred in available else "reference"
    if backend not in available:
        why = f" (extension failed to load: {EXTENSION_ERROR})" if not HAS_EXTENSION else ""
        raise ValueError(f"backend {backend!r} is not available{why}; available: {available}")
    if backend in ("cpu", "cuda") and device.type != backend:
        raise ValueError(f"backend {backend!r} cannot run tensors on device {device}")
    return backend
