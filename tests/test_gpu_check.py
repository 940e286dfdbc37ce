"""benchmarks/gpu_check.sh, checked without a GPU: its syntax, that the test suite collects where detectron2 and
pycocotools are missing (as on the GPU machine), and a run with stand-ins for python3, timeout, date, nvidia-smi,
nvcc and compute-sanitizer: every command under timeout, the whole run within 8 minutes even if every step uses
its full limit, at most 8 result files no more than 2 folders deep."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")

# Stand-ins. Each command logs "<under timeout?> <name> <args>" to $CALLS. The fake clock ($CLOCK, read by `date`)
# stands still, or with WORST_CASE=1 moves in `timeout` by the full limit plus the kill grace: every command
# running until it is killed.
STUBS = {
    "timeout": """
if [ "$1" = -k ]; then grace=$2; shift 2; else grace=0; fi
limit=$1; shift
[ "$WORST_CASE" = 1 ] && echo $(( $(cat "$CLOCK") + limit + grace )) >"$CLOCK"
UNDER_TIMEOUT=1 "$@"
""",
    "date": 'cat "$CLOCK"\n',
    "python3": """
echo "${UNDER_TIMEOUT:-0} python3 $*" >>"$CALLS"
case "$*" in
  "-c import xdist") exit 1 ;;
  "-c import lgd") exit "$NO_LGD" ;;
esac
if [[ "$1" == benchmarks/bench_*.py ]]; then
  args=("$@"); for i in "${!args[@]}"; do [ "${args[i]}" = --out ] && out=${args[i + 1]}; done
  tag=$(basename "$1" .py)_$RANDOM
  for ext in csv json md png; do echo "$tag" >"$out/$tag.$ext"; done
fi
""",
}
for name in ("nvidia-smi", "nvcc", "compute-sanitizer"):
    STUBS[name] = f'echo "${{UNDER_TIMEOUT:-0}} {name} $*" >>"$CALLS"\necho "{name} stand-in"\n'


def test_syntax_and_python3():
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    text = open(SCRIPT).read()
    assert 'PY="${PYTHON:-python3}"' in text
    code = [line.split("#")[0] for line in text.splitlines()]
    assert not [line for line in code if re.search(r"(^|[\s\"'(])python(\s|$)", line)], "plain `python` used"


def run_with_stand_ins(tmp_path, has_lgd, worst_case):
    """(completed run, logged calls, seconds on the fake clock, files under $OUT)."""
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    clock, calls = tmp_path / "clock", tmp_path / "calls"
    clock.write_text("1000\n")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "python3"), OUT=str(out),
               CLOCK=str(clock), CALLS=str(calls), NO_LGD="0" if has_lgd else "1", WORST_CASE=str(int(worst_case)))
    env.pop("GPU_CHECK_SECONDS", None)
    run = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    files = [os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs]
    return run, calls.read_text().splitlines(), int(clock.read_text()) - 1000, files


@pytest.mark.parametrize("has_lgd", [False, True], ids=["no_detectron2", "detectron2"])
def test_every_step_under_timeout_and_few_files(tmp_path, has_lgd):
    run, logged, _, files = run_with_stand_ins(tmp_path, has_lgd, worst_case=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert logged and all(line.startswith("1 ") for line in logged), "\n".join(logged)
    ran = " ".join(logged)
    for expected in ("setup.py build_ext --inplace", "-m pytest", "--tool memcheck", "--tool racecheck",
                     "bench_ops.py --device cuda --shape retinanet faster_rcnn --dtype float32 --layout contiguous",
                     "--dtype bfloat16 --layout channels_last"):
        assert expected in ran, expected
    assert ran.index("bench_ops.py") < ran.index("--tool memcheck"), "benchmarks after the sanitizers"
    assert '-k cuda or triton tests' in ran, "the test step selects the GPU parametrizations"
    assert ("bench_train.py" in ran) == has_lgd
    assert ("skipped bench_train" in run.stdout) != has_lgd
    assert len(files) <= 8 and all(f.count(os.sep) <= 2 for f in files), files
    assert {"summary.txt", "results.tar.gz"} <= set(files)


def test_within_8_minutes_when_every_step_runs_out_its_limit(tmp_path):
    run, logged, seconds, files = run_with_stand_ins(tmp_path, has_lgd=True, worst_case=True)
    assert all(line.startswith("1 ") for line in logged) and "summary.txt" in files, run.stdout + run.stderr
    assert seconds <= 8 * 60, run.stdout


def test_suite_collects_without_detectron2_and_pycocotools(tmp_path):
    """Every module that needs them skips itself (pytest.importorskip) instead of failing collection."""
    for name in ("detectron2", "pycocotools"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ModuleNotFoundError('{name} hidden', name='{name}')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0 and "ERROR" not in out, out[-4000:]
    assert "tests/test_box_pool.py::" in out and "tests/test_lgd_distiller.py::" not in out, out[-4000:]
