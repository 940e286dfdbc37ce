"""lgd's commands: argument parsing on top of lgd.runner (lgd-train, lgd-eval, lgd-export, lgd-demo, lgd-bench).

Importing the command layer hides two deprecation notices our pinned dependencies print at import (fvcore and
detectron2 call torch.jit.script; detectron2 v0.6's model zoo imports pkg_resources): noise on every command's
stderr that no user can act on. The library itself (`import lgd`) changes no global state.
"""
import warnings

warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"pkg_resources is deprecated", category=UserWarning)
