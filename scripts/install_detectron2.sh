#!/usr/bin/env bash
# Install detectron2 v0.6 (pure Python, without its C++ extension) into ${PYTHON:-python}.
#
# detectron2 is not on PyPI under its own name. The sdist `pb1-detectron2==0.6` carries upstream
# detectron2 v0.6's Python files, but not its C++ sources, so it does not build as shipped. This script:
#   1. exits at once if `import detectron2` already works (e.g. upstream detectron2 built from source),
#      only adding setuptools<81 if that install's detectron2.model_zoo lacks pkg_resources;
#   2. downloads the sdist pinned by sha256, unpacks and patches it (see patch_sdist below);
#   3. installs its runtime dependencies (pillow<10, setuptools<81), never touching torch/torchvision/numpy;
#   4. installs the patched sdist (non-editable, no build isolation: its setup.py imports torch);
#   5. checks that detectron2.{layers,modeling,evaluation,model_zoo} import and model-zoo configs are found.
# Without the extension, the C++ ops (deformable conv, rotated boxes/ROIAlign, fast COCOeval) raise a
# RuntimeError when called: use torchvision.ops and COCOEvaluator(..., use_fast_impl=False) instead.
#
# Usage: bash scripts/install_detectron2.sh          (PYTHON=/path/to/venv/bin/python to pick an interpreter)
set -euo pipefail

PY="${PYTHON:-python}"
SDIST_NAME="pb1-detectron2"
SDIST_VERSION="0.6"
SDIST_SHA256="5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"

# Runtime dependencies that detectron2 v0.6 imports (ranges from its setup.py). Left out on purpose:
# black (only LazyConfig.to_py), future/pydot (caffe2 export), tensorboard (only TensorboardXWriter,
# i.e. DefaultTrainer's default writers; `pip install tensorboard` if you use them).
# Pins: pillow<10 because v0.6 uses Image.LINEAR at import time (removed in Pillow 10);
#       setuptools<81 because detectron2.model_zoo imports pkg_resources (removed in setuptools 81).
DEPS=(
  "pillow>=7.1,<10"
  "setuptools<81"
  "fvcore>=0.1.5,<0.1.6"
  "iopath>=0.1.7,<0.1.10"
  "omegaconf>=2.1"
  "hydra-core>=1.1"
  "pycocotools>=2.0.2"
  "matplotlib"
  "termcolor>=1.1"
  "yacs>=0.1.8"
  "tabulate"
  "cloudpickle"
  "tqdm>4.29.0"
  "pyyaml"
)

log() { echo "[install_detectron2] $*"; }
die() { echo "[install_detectron2] ERROR: $*" >&2; exit 1; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/install_detectron2.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# Run python from the empty temp dir, so a `detectron2/` folder in the caller's cwd is not mistaken
# for an installed package.
py_in_tmp() { (cd "$WORK" && "$PY" "$@"); }
pip_() { "$PY" -m pip "$@"; }

"$PY" -c "import sys" 2>/dev/null || die "python interpreter '$PY' not found (set PYTHON=...)"
log "python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

# ---------------------------------------------------------------------------------------------------
# 1. Already installed? Leave it alone.
# ---------------------------------------------------------------------------------------------------
# One interpreter start: prints "absent" or "import_fails", or the install's location then "ok" /
# "no_pkg_resources" / "broken" (import errors go to stderr).
PROBE_PY='
import os, sys
try:
    import detectron2
except ModuleNotFoundError as e:
    if e.name != "detectron2":
        raise
    print("absent"); sys.exit()
except Exception as e:
    print("import_fails"); print(repr(e), file=sys.stderr); sys.exit()
print("detectron2 %s @ %s" % (getattr(detectron2, "__version__", "?"), os.path.dirname(detectron2.__file__)))
try:
    import detectron2.model_zoo
except ModuleNotFoundError as e:
    print("no_pkg_resources" if e.name == "pkg_resources" else "broken"); print(repr(e), file=sys.stderr)
except Exception as e:
    print("broken"); print(repr(e), file=sys.stderr)
else:
    print("ok")
'
probe_detectron2() { py_in_tmp -W ignore -c "$PROBE_PY" 2>"$WORK/probe.err" | tail -n 1; }

STATE="$(py_in_tmp -W ignore -c "$PROBE_PY" 2>"$WORK/probe.err")" || { cat "$WORK/probe.err" >&2; die "probing detectron2 failed"; }
if [ "$STATE" = "import_fails" ]; then
  cat "$WORK/probe.err" >&2
  die "a detectron2 package is present but 'import detectron2' fails (see above); fix or uninstall it first"
fi
if [ "$STATE" != "absent" ]; then
  log "already importable: $(head -n 1 <<<"$STATE")"
  case "$(tail -n 1 <<<"$STATE")" in
    ok) ;;
    no_pkg_resources)
      log "detectron2.model_zoo needs pkg_resources (gone in setuptools>=81): installing setuptools<81"
      pip_ install "setuptools<81"
      [ "$(probe_detectron2)" = ok ] || { cat "$WORK/probe.err" >&2; die "import detectron2.model_zoo still fails"; }
      ;;
    *)
      cat "$WORK/probe.err" >&2
      log "WARNING: 'import detectron2.model_zoo' fails (see above); not touching the existing install"
      ;;
  esac
  log "nothing to do"
  exit 0
fi

py_in_tmp -c "import torch, torchvision" 2>/dev/null \
  || die "torch and torchvision must be installed first (detectron2's setup.py imports torch)"
log "torch $(py_in_tmp -c 'import torch; print(torch.__version__)'), torchvision $(py_in_tmp -c 'import torchvision; print(torchvision.__version__)')"

# ---------------------------------------------------------------------------------------------------
# 2. Download the sdist, pinned by hash (pip checks it, and we check it again ourselves).
#    --no-binary :all: : it is an sdist; --no-build-isolation: its setup.py imports torch, which an
#    isolated build env would not have (pip runs setup.py to read the metadata even for a download).
# ---------------------------------------------------------------------------------------------------
log "downloading ${SDIST_NAME}==${SDIST_VERSION} (sha256 ${SDIST_SHA256})"
echo "${SDIST_NAME}==${SDIST_VERSION} --hash=sha256:${SDIST_SHA256}" > "$WORK/requirements.txt"
pip_ download --quiet --no-deps --no-build-isolation --no-binary :all: --require-hashes \
  -r "$WORK/requirements.txt" -d "$WORK/dl" \
  || die "pip download of ${SDIST_NAME}==${SDIST_VERSION} failed"
SDIST="$WORK/dl/${SDIST_NAME}-${SDIST_VERSION}.tar.gz"
[ -f "$SDIST" ] || die "expected $SDIST, got: $(ls "$WORK/dl")"
GOT_SHA="$("$PY" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$SDIST")"
[ "$GOT_SHA" = "$SDIST_SHA256" ] \
  || die "sha256 mismatch for $(basename "$SDIST"): got $GOT_SHA, expected $SDIST_SHA256"
log "sha256 verified"

mkdir -p "$WORK/src"
tar -xzf "$SDIST" -C "$WORK/src"
SRC="$WORK/src/${SDIST_NAME}-${SDIST_VERSION}"
[ -f "$SRC/setup.py" ] || die "unexpected sdist layout: no $SRC/setup.py"

# ---------------------------------------------------------------------------------------------------
# 3. Patch the unpacked sdist. Every replacement must match exactly as expected, else we stop.
# ---------------------------------------------------------------------------------------------------
log "patching the sdist"
"$PY" - "$SRC" <<'PATCH'
import pathlib, re, shutil, sys

src = pathlib.Path(sys.argv[1])

def replace_once(path, old, new):
    text = path.read_text()
    n = text.count(old)
    if n != 1:
        sys.exit(f"[install_detectron2] ERROR: patch of {path.name}: expected 1 match of {old!r}, found {n}")
    path.write_text(text.replace(old, new))

setup_py = src / "setup.py"

# (a) The sdist has no detectron2/layers/csrc, so get_extensions() would declare an extension with no
#     sources and the build fails. Build pure Python; the C++ ops are replaced by detectron2/_C.py (e).
replace_once(setup_py, "ext_modules=get_extensions(),", "ext_modules=[],")

# (b) get_model_zoo_configs() globs a top-level configs/ dir that this sdist does not have (the configs
#     sit in detectron2/model_zoo/configs already), so no config was installed and
#     model_zoo.get_config_file()/get_config() failed. List the .yaml/.py configs relative to the package.
replace_once(
    setup_py,
    'package_data={"detectron2.model_zoo": get_model_zoo_configs()},',
    'package_data={"detectron2.model_zoo": _model_zoo_configs_in_package()},',
)
replace_once(
    setup_py,
    "# For projects that are relative small",
    '''def _model_zoo_configs_in_package() -> List[str]:
    # Patched by lgd's scripts/install_detectron2.sh: configs live inside the package in this sdist.
    pkg_dir = path.join(path.dirname(path.abspath(__file__)), "detectron2", "model_zoo")
    found = []
    for ext in ("yaml", "py"):
        found += glob.glob(path.join(pkg_dir, "configs", "**", "*." + ext), recursive=True)
    assert found, "no model-zoo configs found under " + pkg_dir
    return sorted(path.relpath(p, pkg_dir) for p in found)


# For projects that are relative small''',
)

# (c) Declared dependencies: match what we install, so `pip check` is clean and later pip runs keep the
#     pins. Pillow<10: Image.LINEAR is used at import time. setuptools<81: model_zoo imports
#     pkg_resources. Dropped: black==21.4b2 (only LazyConfig.to_py; that old black breaks on new click),
#     future and pydot (caffe2 export only), tensorboard (only TensorboardXWriter).
replace_once(setup_py, '"Pillow>=7.1",', '"Pillow>=7.1,<10",\n        "setuptools<81",')
for dropped in ('"tensorboard",', '"future",', '"pydot",', '"black==21.4b2",'):
    replace_once(setup_py, dropped, "# " + dropped + "  (dropped by lgd's install_detectron2.sh)")

# (d) NumPy >= 1.24 removed the aliases np.int/np.float/np.str (np.bool too, until numpy 2.0 re-added
#     it); v0.6 uses them at run time, e.g. data/build.py's class histogram in the training data
#     loader. They were plain aliases of the builtins, so the rewrite keeps behaviour. NumPy 2 also made
#     np.array(x, copy=False) raise when a copy is needed (mask_ops.paste_mask_in_image_old, PIL image).
alias = re.compile(r"\bnp\.(bool|int|float|str)\b")
n_alias = 0
for f in sorted((src / "detectron2").rglob("*.py")):
    text = f.read_text()
    new, n = alias.subn(r"\1", text)
    if n:
        f.write_text(new)
        n_alias += n
if n_alias == 0:
    sys.exit("[install_detectron2] ERROR: expected numpy alias uses in detectron2 v0.6, found none")
replace_once(src / "detectron2/layers/mask_ops.py", "np.array(mask, copy=False)", "np.asarray(mask)")

# (e) detectron2._C placeholder. detectron2 does `from detectron2 import _C` at import time
#     (layers/deform_conv.py, layers/rotated_boxes.py, layers/roi_align_rotated.py,
#     evaluation/fast_eval_api.py), so it must import; any C++ op called through it raises a clear
#     error. utils/collect_env.py (called by engine.default_setup) calls get_compiler_version(),
#     get_cuda_version() and has_cuda(), so those return descriptive values instead of raising.
(src / "detectron2" / "_C.py").write_text('''\
"""Placeholder for detectron2's C++ extension (added by lgd's scripts/install_detectron2.sh).

This detectron2 was installed from PyPI's pb1-detectron2 sdist, which ships no C++ sources. Importing this
module works; calling any C++ op through it raises RuntimeError.
"""

_MESSAGE = (
    "detectron2 was installed without its C++ extension (lgd's scripts/install_detectron2.sh), so "
    "detectron2._C.{name} is unavailable. Use torchvision.ops (e.g. torchvision.ops.deform_conv2d) "
    "instead of detectron2's deformable conv, avoid rotated boxes/ROIAlignRotated, and use "
    "COCOEvaluator(..., use_fast_impl=False); or install detectron2 from source with its extension."
)


def get_compiler_version():
    return "none (detectron2 built without its C++ extension)"


def get_cuda_version():
    return "none (detectron2 built without its C++ extension)"


def has_cuda():
    return False


def _missing_op(name):
    def op(*args, **kwargs):
        raise RuntimeError(_MESSAGE.format(name=name))

    op.__name__ = op.__qualname__ = name
    return op


def __getattr__(name):
    # Dunder lookups (__path__, __wrapped__, ...) made by importlib, pickle, inspect or doctest must
    # fail normally, not return a callable.
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing_op(name)
''')

# (f) The sdist's stale egg-info (old requirements list) would be reused by setuptools; regenerate it.
shutil.rmtree(src / "pb1_detectron2.egg-info", ignore_errors=True)
print(f"[install_detectron2] patched setup.py, detectron2/_C.py and {n_alias} numpy alias uses")
PATCH

# ---------------------------------------------------------------------------------------------------
# 4. Dependencies, then detectron2 itself (last, so that "import detectron2 works" in step 1 means a
#    finished install). The constraints keep the installed torch/torchvision/numpy exactly as they are.
# ---------------------------------------------------------------------------------------------------
py_in_tmp - > "$WORK/keep.txt" <<'KEEP'
from importlib import metadata
for dist in ("torch", "torchvision", "numpy"):
    try:
        print(f"{dist}=={metadata.version(dist)}")
    except metadata.PackageNotFoundError:
        pass
KEEP
log "keeping as installed: $(tr '\n' ' ' < "$WORK/keep.txt")"
log "installing runtime dependencies: ${DEPS[*]}"
pip_ install -c "$WORK/keep.txt" "${DEPS[@]}" || die "installing detectron2's dependencies failed"

log "building and installing the patched ${SDIST_NAME} ${SDIST_VERSION} (no C++ extension)"
pip_ install --no-build-isolation --no-deps "$SRC" || die "installing the patched sdist failed"

# ---------------------------------------------------------------------------------------------------
# 5. Check.
# ---------------------------------------------------------------------------------------------------
log "checking the install"
py_in_tmp - <<'CHECK' || die "post-install check failed"
import os
import detectron2, detectron2.layers, detectron2.modeling, detectron2.evaluation, detectron2.model_zoo
from detectron2 import model_zoo

yaml_cfg = model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml")
assert os.path.isfile(yaml_cfg), yaml_cfg
lazy_cfg = model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.py")
assert os.path.isfile(lazy_cfg), lazy_cfg
print(f"[install_detectron2] OK: detectron2 {detectron2.__version__} @ {os.path.dirname(detectron2.__file__)}")
CHECK
