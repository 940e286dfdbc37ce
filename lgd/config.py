"""Loading a LazyConfig with strict `key=value` overrides: a key that does not exist is an error, not a new key.

detectron2's LazyConfig.apply_overrides adds any key it is given, so a typo (`trian.max_iter=2`,
`lgd.enabld=False`) is accepted and silently ignored. apply_overrides_strict accepts a key when
  - it exists in the config (its value may be None), or
  - it is an argument of the LazyCall object it would sit in (`model.test_score_thresh=0.0`: RetinaNet
    takes test_score_thresh although the model-zoo config leaves it at its default), or
  - it is one of OPTIONAL_KEYS, keys lgd and detectron2 read when present (train.seed), or
  - it is written `+key=value` (hydra's syntax for adding a key): the deliberate way to add one.
Anything else raises UsageError naming the key and the closest valid keys (difflib). A malformed override
(no `=`, bad value syntax) raises UsageError naming it. A key of REMOVED_KEYS, used in an override or set in a
config (check_removed_keys), is a one-line UsageError naming what replaced it.
"""
import difflib
import inspect
import os
from typing import Iterable, List

from detectron2.config import LazyConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from .errors import CommandError, UsageError

__all__ = ["OPTIONAL_KEYS", "REMOVED_KEYS", "apply_overrides_strict", "check_removed_keys", "config_keys",
           "load_config"]

# keys read when present although detectron2's common/train.py does not define them
OPTIONAL_KEYS = {
    "train.seed": "seed of the initialisation, data order and augmentations (lgd default 0)",
    "train.cudnn_benchmark": "torch.backends.cudnn.benchmark while training (detectron2's default_setup)",
}
# keys lgd no longer reads -> where their setting went
REMOVED_KEYS = {
    "lgd.enabled": "is gone: the baseline is lgd.method=baseline (LGD: lgd.method=lgd)",
    "lgd.precision": "moved to train.amp.precision",
    "lgd.channels_last": "moved to train.amp.channels_last",
    "lgd.clip_type": "moved to train.clip_gradients.clip_type",
    "lgd.clip_value": "moved to train.clip_gradients.clip_value",
}
_MISSING = object()


def _removed(key) -> UsageError:
    return UsageError(f"{key} {REMOVED_KEYS[key]}")


def check_removed_keys(cfg):
    """A UsageError for the first key of REMOVED_KEYS that cfg sets (a config file written for an older lgd)."""
    for key in REMOVED_KEYS:
        if _exists(cfg, key):
            raise _removed(key)


def _children(node):
    if isinstance(node, DictConfig):
        for key in node.keys():
            yield str(key), node._get_node(key)
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            yield str(i), node._get_node(i)


def config_keys(cfg) -> List[str]:
    """Every dotted key of cfg (inner nodes included), plus the arguments of its LazyCall nodes."""
    keys = []

    def walk(node, prefix):
        for name, child in _children(node):
            if name == "_target_":
                continue
            key = f"{prefix}{name}"
            keys.append(key)
            if isinstance(child, (DictConfig, ListConfig)):
                walk(child, key + ".")
        if isinstance(node, DictConfig):
            keys.extend(prefix + p for p in _target_arguments(node) if p not in node)

    walk(cfg, "")
    return keys + [k for k in OPTIONAL_KEYS if k not in keys]


def _target_arguments(node) -> List[str]:
    """Keyword arguments of a LazyCall node's target (["*"] when it takes **kwargs); [] for other nodes."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return []
    target = node._get_node("_target_")._value()
    if isinstance(target, str):
        try:
            from detectron2.utils.registry import locate

            target = locate(target)
        except Exception:  # noqa: BLE001 - an unresolvable target: instantiate will say so
            return []
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names + (["*"] if any(p.kind == p.VAR_KEYWORD for p in params) else [])


def _exists(cfg, key) -> bool:
    try:
        return OmegaConf.select(cfg, key, default=_MISSING, throw_on_resolution_failure=False) is not _MISSING
    except Exception:  # noqa: BLE001 - e.g. indexing into a non-container: not an existing key
        return False


def _accepted(cfg, key) -> bool:
    if key in OPTIONAL_KEYS or _exists(cfg, key):
        return True
    parent, _, name = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    args = _target_arguments(node)
    return name in args or "*" in args


def apply_overrides_strict(cfg, overrides: Iterable[str]):
    """LazyConfig.apply_overrides(cfg, overrides) after checking every key (module docstring). In place."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    overrides = list(overrides)
    parser = OverridesParser.create()
    for text in overrides:
        try:
            (parsed,) = parser.parse_overrides([text])
        except HydraException as exc:
            first = str(exc).strip().splitlines()
            hint = ("quote a value with non-ASCII characters: KEY='VALUE' (in a shell: \"KEY='VALUE'\")"
                    if not text.isascii() else "overrides come last on the command line, e.g. train.max_iter=100")
            raise UsageError(f"config override {text!r} is not KEY=VALUE ({first[1] if len(first) > 1 else first[0]})",
                             hint=hint) from None
        key = parsed.key_or_group
        if key in REMOVED_KEYS:
            raise UsageError(f"config override {text!r}: {_removed(key)}")
        if parsed.is_delete():
            raise UsageError(f"config override {text!r}: deleting a key (~KEY) is not supported")
        if parsed.is_add() or _accepted(cfg, key):
            continue
        close = difflib.get_close_matches(key, config_keys(cfg), n=3, cutoff=0.6)
        hint = (f"did you mean {', '.join(close)}?" if close else "list the keys with the config file") + \
            f" (to add a new key on purpose, write +{key}=...)"
        raise UsageError(f"config override {text!r}: the config has no key {key!r}", hint=hint)
    return LazyConfig.apply_overrides(cfg, [o[1:] if o.startswith("+") else o for o in overrides])


def load_config(config_file, overrides=()):
    """LazyConfig.load(config_file) with `key=value` overrides applied strictly. A missing or broken file is
    one error naming it."""
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file not found: {config_file}")
    try:
        cfg = LazyConfig.load(config_file)
    except Exception as exc:  # noqa: BLE001 - anything a python config file can raise
        raise CommandError(f"config file {config_file} cannot be loaded: {type(exc).__name__}: {exc}",
                           hint="rerun with --debug for the traceback") from exc
    return apply_overrides_strict(cfg, overrides)
