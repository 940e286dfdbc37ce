"""benchmarks/gpu_check.sh, checked without a GPU: its syntax; its schedule (the budgets fit the deadline, which fits
the device machine's 600 s per command with room for start-up), rehearsed in its dry-run mode (every step starts
even when each one before it runs out its limit; a step without its whole budget left is "skipped: no time", not
failed); a run with stand-ins for python3, timeout, nvidia-smi, nvcc and compute-sanitizer (every command under
timeout, at most 8 result files no more than 2 folders deep); that the test suite collects where detectron2 and
pycocotools are missing (as on the GPU machine); and that bench_ops keeps the cases it finished when stopped."""
import csv
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
DEVICE_COMMAND_LIMIT = 600  # seconds per command on the device machine
START_UP = 60  # what the device machine's start and transfers may take of it, at least


def script_settings():
    """(budgets by step, probe seconds, reserve, default deadline) as the script sets them."""
    text = open(SCRIPT).read()
    budgets = {k: int(v) for k, v in re.findall(r"\[(\w+)\]=(\d+)", re.search(r"BUDGETS=\((.*?)\)", text, re.S)[1])}
    number = lambda name: int(re.search(rf"^{name}=(\d+)", text, re.M)[1])  # noqa: E731
    deadline = int(re.search(r"GPU_CHECK_SECONDS:-(\d+)", text)[1])
    return budgets, number("PROBE_SECONDS"), number("RESERVE"), deadline


def test_syntax_and_python3():
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    text = open(SCRIPT).read()
    assert 'PY="${PYTHON:-python3}"' in text
    code = [line.split("#")[0] for line in text.splitlines()]
    assert not [line for line in code if re.search(r"(^|[\s\"'(])python(\s|$)", line)], "plain `python` used"


def test_budgets_fit_the_deadline_and_the_device_limit():
    """Even if every probe and step ran until killed (its whole budget) and the packing took its reserve."""
    budgets, probe, reserve, deadline = script_settings()
    assert len(budgets) == 9 and all(b > 5 for b in budgets.values()), budgets
    assert sum(budgets.values()) + 3 * probe + reserve <= deadline <= DEVICE_COMMAND_LIMIT - START_UP
    steps = re.findall(r"^\s*step (\"?[\w$]+)", open(SCRIPT).read(), re.M)
    named = {s for s in steps if not s.startswith('"')} | {f"bench_ops_{d}" for d in ("float32", "bfloat16")}
    assert named == set(budgets), (steps, budgets)


def dry_run(tmp_path, **env):
    """The script's dry run: (completed run, {step: 'ok' | 'FAILED' | 'skipped'}, seconds of the schedule)."""
    env = dict({k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}, GPU_CHECK_DRY_RUN="1",
               OUT=str(tmp_path / "out"), **env)
    run = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    states = dict((name, state) for state, name in re.findall(r"^\[gpu_check\] (ok|FAILED|skipped) +(\w+)",
                                                              run.stdout, re.M))
    seconds = float(re.search(r"step\(s\) failed, ([\d.]+) s", run.stdout)[1])
    return run, states, seconds


def test_dry_run_every_step_starts_when_each_runs_out_its_limit(tmp_path):
    """Every stand-in sleeps twice its limit and is killed at it: all steps still start, and the run ends
    before the deadline less the packing's reserve."""
    budgets, _, reserve, deadline = script_settings()
    run, states, seconds = dry_run(tmp_path, GPU_CHECK_DRY_FILL="200")
    assert states == {name: "FAILED" for name in budgets}, run.stdout
    assert run.stdout.count("timed out after") == len(budgets) and run.returncode == len(budgets), run.stdout
    assert seconds <= deadline - reserve, run.stdout
    assert os.path.isfile(tmp_path / "out" / "summary.txt")


def test_dry_run_steps_within_their_limits_all_pass(tmp_path):
    budgets, _, _, deadline = script_settings()
    run, states, seconds = dry_run(tmp_path)
    assert run.returncode == 0 and states == {name: "ok" for name in budgets}, run.stdout + run.stderr
    assert seconds < deadline, run.stdout


def test_dry_run_a_step_without_its_whole_budget_is_skipped_not_failed(tmp_path):
    """A 250 s deadline (230 s for the steps) and a build overrunning its limit: by the op benchmarks (60 s each)
    ~55 s are left, so they are skipped: no time; memcheck (40 s) and racecheck (20 s) still fit and run, the
    training benchmark (40 s) no longer does; only the build is a failure. Stand-ins take half their limit;
    times run 20x faster (each step that runs has >= 12 s of slack: 0.6 s here)."""
    budgets, _, _, _ = script_settings()
    run, states, seconds = dry_run(tmp_path, GPU_CHECK_SECONDS="250", GPU_CHECK_DRY_OVERRUN="build",
                                   GPU_CHECK_DRY_SCALE="20")
    assert run.returncode == 1, run.stdout
    assert states == {"device": "ok", "build": "FAILED", "backends": "ok", "tests": "ok",
                      "bench_ops_float32": "skipped", "bench_ops_bfloat16": "skipped", "memcheck": "ok",
                      "racecheck": "ok", "bench_train": "skipped"}, run.stdout
    for name in ("bench_ops_float32", "bench_ops_bfloat16", "bench_train"):
        assert re.search(rf"skipped {name}: no time \(budget {budgets[name]} s, [\d.]+ s left\)", run.stdout)
    assert seconds <= 250, run.stdout


# Stand-ins for the real run. Each command logs "<under timeout?> <name> <args>" to $CALLS.
STUBS = {
    "timeout": """
[ "$1" = -k ] && shift 2
shift
UNDER_TIMEOUT=1 "$@"
""",
    "python3": """
echo "${UNDER_TIMEOUT:-0} python3 $*" >>"$CALLS"
case "$*" in
  "-c import xdist") exit 1 ;;
  "-c import lgd") exit "$NO_LGD" ;;
esac
if [ "$1" = -m ] && [[ "$2" == lgd_ops.bench_ops || "$2" == lgd.benchmarks.train ]]; then
  args=("$@"); for i in "${!args[@]}"; do [ "${args[i]}" = --out ] && out=${args[i + 1]}; done
  tag=${2##*.}_$RANDOM
  for ext in csv json md png; do echo "$tag" >"$out/$tag.$ext"; done
fi
""",
}
for name in ("nvidia-smi", "nvcc", "compute-sanitizer"):
    STUBS[name] = f'echo "${{UNDER_TIMEOUT:-0}} {name} $*" >>"$CALLS"\necho "{name} stand-in"\n'


@pytest.mark.parametrize("has_lgd", [False, True], ids=["no_detectron2", "detectron2"])
def test_every_step_under_timeout_and_few_files(tmp_path, has_lgd):
    bin_dir, out, calls = tmp_path / "bin", tmp_path / "out", tmp_path / "calls"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    env = dict({k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")},
               PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "python3"), OUT=str(out),
               CALLS=str(calls), NO_LGD="0" if has_lgd else "1")
    run = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    files = [os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs]
    logged = calls.read_text().splitlines()
    assert run.returncode == 0, run.stdout + run.stderr
    assert logged and all(line.startswith("1 ") for line in logged), "\n".join(logged)
    ran = " ".join(logged)
    for expected in ("setup.py build_ext --inplace", "-m pytest", "--tool memcheck", "--tool racecheck",
                     "-m lgd_ops.bench_ops --device cuda --shape retinanet faster_rcnn --dtype float32 --layout contiguous",
                     "--dtype bfloat16 --layout channels_last"):
        assert expected in ran, expected
    assert ran.index("lgd_ops.bench_ops") < ran.index("--tool memcheck"), "benchmarks after the sanitizers"
    assert '-k cuda or triton tests' in ran, "the test step selects the GPU parametrizations"
    assert ("lgd.benchmarks.train" in ran) == has_lgd
    assert ("skipped bench_train" in run.stdout) != has_lgd
    assert len(files) <= 8 and all(f.count(os.sep) <= 2 for f in files), files
    assert {"summary.txt", "results.tar.gz"} <= set(files)


def test_bench_ops_keeps_finished_cases_when_stopped(tmp_path, monkeypatch):
    """While its third case runs, the CSV on disk holds the first two cases' rows: a run killed then (by a
    timeout, with no chance to flush or close anything) keeps them."""
    import lgd_ops.bench_ops as bench

    for key, value in bench.STEADY_MALLOC.items():  # no re-exec
        monkeypatch.setenv(key, value)
    timed, on_disk = [], []

    class Stopped(Exception):
        pass

    def time_it(fn, device, repeats):
        if len(timed) == 2:
            with open(tmp_path / "ops_cpu_tiny_float32.csv") as f:
                on_disk.extend(csv.DictReader(f))
            raise Stopped
        timed.append(fn)
        return 1.0, 2.0, 3.0

    monkeypatch.setattr(bench, "time_it", time_it)
    monkeypatch.setattr(bench, "copy_bandwidth", lambda device: 10.0)
    with pytest.raises(Stopped):
        bench.main(["--device", "cpu", "--shape", "tiny", "--ops", "box_pool", "--backends", "reference",
                    "--modes", "forward", "backward", "full", "--objects", "3", "--no-memory", "--out",
                    str(tmp_path)])
    assert {r["mode"] for r in on_disk} == {"forward", "backward"}, on_disk
    assert {r["p50"] for r in on_disk if r["metric"] == "time_ms"} == {"2.0"}


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
