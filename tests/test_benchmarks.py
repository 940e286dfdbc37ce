"""The benchmarks still run end to end on tiny shapes and write their files (CSV/JSON/markdown/PNG).
Times are never asserted: benchmarks are not tests."""
import csv
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("detectron2")

import torch

import lgd_ops.bench_ops as bench
from lgd.tools.bench import main as lgd_bench

# the installed command runs from any folder: the benchmarks are modules of the package, not scripts of the tree
ELSEWHERE = os.path.dirname(os.path.abspath(os.sep))


def run(command, *args):
    """`lgd-bench ops|train args` (through python -m lgd.tools.bench, as the console script would)."""
    cmd = [sys.executable, "-m", "lgd.tools.bench", command, "--threads", "1", *args]  # 1 thread: no oversubscription
    return subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ELSEWHERE).stdout


def test_bench_ops_tiny(tmp_path):
    out = run("ops", "--shape", "tiny", "--repeats", "1", "--objects", "3", "--backends", "reference", "cpu",
              "--no-memory", "--out", str(tmp_path))
    assert "| tiny | 2 | float32 | box_pool | 3 | cpu |" in out and "| normalized_mse | - | cpu |" in out
    assert "auto chooses" in out and all(f"{op}/cpu/float32/contiguous -> " in out for op in bench.OPS)
    with open(tmp_path / "ops_cpu_tiny_float32.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["op"], r["backend"], r["mode"]) for r in rows} == {
        (op, b, m) for op in ("box_pool", "box_fill", "normalized_mse") for b in ("reference", "cpu")
        for m in ("forward", "backward", "full")}
    times = [r for r in rows if r["metric"] == "time_ms"]
    assert all(0 < float(r["p20"]) <= float(r["p50"]) <= float(r["p80"]) for r in times)
    assert {r["metric"] for r in rows} == {"time_ms", "gbps", "bw_fraction", "vs_ref"}
    assert all(r["device"] and r["torch"] and r["commit"] for r in rows)
    assert json.loads((tmp_path / "ops_cpu_tiny_float32.json").read_text())[0]["metric"] == "time_ms"
    assert (tmp_path / "ops_cpu_tiny_float32_time.png").stat().st_size > 0


def test_bench_ops_channels_last(tmp_path):
    """--layout channels_last: the maps (and so box_fill's output) in the fast path's memory format, named in the
    table, the rows and the file name."""
    out = run("ops", "--shape", "tiny", "--repeats", "1", "--objects", "2", "--ops", "box_fill", "--modes", "full",
              "--backends", "cpu", "--layout", "channels_last", "--no-memory", "--out", str(tmp_path))
    assert "| tiny | 2 | float32, channels_last | box_fill | 2 | cpu |" in out
    with open(tmp_path / "ops_cpu_tiny_float32_channels_last.csv") as f:
        assert {r["layout"] for r in csv.DictReader(f)} == {"channels_last"}
    case = bench.make_case("box_pool", "tiny", 2, torch.float32, "cpu", layout="channels_last")
    assert case.memory_format == torch.channels_last


def test_bench_ops_peak_memory_and_bytes():
    cpu = torch.device("cpu")
    assert bench.peak_memory("box_fill", "tiny", 3, torch.float32, cpu, "reference", 1) >= 0
    # normalized_mse full: read student + teacher, then read both and write the student's gradient
    m = sum(2 * 8 * h * w for h, w in bench.SHAPES["tiny"][4])
    assert bench.min_bytes("normalized_mse", "full", "tiny", 0, 0, torch.bfloat16) == 2 * 5 * m


def test_bench_train_tiny(tmp_path):
    out = run("train", "--detectors", "retinanet", "--variants", "baseline", "lgd_fused", "--image", "64",
              "64", "--objects", "2", "--iters", "1", "--modes", "fp32", "fast", "--out", str(tmp_path))
    assert "| retinanet | lgd_fused | fp32 on cpu, NCHW |" in out and "| retinanet | lgd_fused fast |" in out
    assert "| retinanet | LGD fast step / fp32 baseline step |" in out  # the targets table
    with open(tmp_path / "train_cpu.csv") as f:
        rows = list(csv.DictReader(f))
    metrics = {(r["variant"], r["mode"], r["metric"]) for r in rows}
    assert {("baseline", "fp32", "step_ms"), ("lgd_fused", "fp32", "step_ms"), ("lgd_fused", "fp32", "peak_mb"),
            ("lgd_fused", "fp32", "box_pool_ms"), ("lgd_fused", "fp32", "instructive_head_loss_ms"),
            ("baseline", "fp32", "forward_other_ms"), ("baseline", "fast", "step_ms"),
            ("lgd_fused", "fast", "peak_mb"), ("lgd_fused", "fast", "teacher_copies")} <= metrics
    assert (tmp_path / "train_cpu.png").stat().st_size > 0


def test_bench_train_methods_cost_table(tmp_path):
    """--methods: each run built as lgd-train builds it (LabelEnc's step 1 as its stage run, with its own
    iteration count), tf-KD refused for RetinaNet with the reason; totals = stage runs + main run."""
    out = run("train", "--detectors", "retinanet", "--methods", "baseline", "labelenc", "tfkd", "--image", "64", "64",
              "--objects", "2", "--iters", "1", "--modes", "fp32", "--overrides", "+lgd.labelenc.step1_iters=500",
              "--out", str(tmp_path))
    assert "| retinanet | fp32 | labelenc | labelenc_step1 | fp32 on cpu, NCHW |" in out
    assert "| retinanet | fp32 | tfkd | not built: ValueError: tf-KD_reg" in out and "random weights" in out
    methods = json.loads((tmp_path / "methods_cpu.json").read_text())["results"]["retinanet"]["fp32"]
    assert "softmax box classifiers" in methods["tfkd"]["skipped"]
    base, labelenc = methods["baseline"], methods["labelenc"]
    assert list(base["runs"]) == ["main"] and list(labelenc["runs"]) == ["labelenc_step1", "main"]
    assert [r["iterations"] for r in labelenc["runs"].values()] == [500, 90000]  # step1_iters; the 1x schedule
    for entry in (base, labelenc):
        for r in entry["runs"].values():
            assert r["cost_h"] == pytest.approx(r["step_ms"][1] * r["iterations"] / 3.6e6)
            assert r["held_mb"] > 100 and r["peak_mb"] >= 0  # R50 weights + gradients + momentum
        assert entry["total_h"] == pytest.approx(sum(r["cost_h"] for r in entry["runs"].values()))
    assert labelenc["total_h"] > labelenc["runs"]["main"]["cost_h"] > 0
    assert base["vs_baseline"] == 1.0
    assert labelenc["vs_baseline"] == pytest.approx(labelenc["total_h"] / base["total_h"])
    with open(tmp_path / "methods_cpu.csv") as f:
        rows = list(csv.DictReader(f))
    totals = {r["method"]: float(r["p50"]) for r in rows if r["run"] == "total" and r["metric"] == "total_h"}
    assert totals == pytest.approx({"baseline": base["total_h"], "labelenc": labelenc["total_h"]})
    assert (tmp_path / "methods_cpu.png").stat().st_size > 0


def test_lgd_bench_usage():
    for argv in ([], ["nope"]):
        with pytest.raises(SystemExit, match="usage: lgd-bench"):
            lgd_bench(argv)


def lgd_bench_process(*args):
    """`python -m lgd.tools.bench args`, import-time warnings of detectron2 silenced (not the command's output)."""
    return subprocess.run([sys.executable, "-m", "lgd.tools.bench", *args], capture_output=True, text=True,
                          cwd=ELSEWHERE, env=dict(os.environ, PYTHONWARNINGS="ignore"), timeout=300)


@pytest.mark.parametrize("command", ["ops", "train"])
def test_help_names_the_command(command):
    proc = lgd_bench_process(command, "--help")
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: lgd-bench {command} "), proc.stdout[:200]
    if command == "train":  # the fast path's switch, the training methods
        assert "--modes" in proc.stdout and "lgd-train --fast" in proc.stdout and "--methods" in proc.stdout


@pytest.mark.parametrize("args,expected", [
    (["ops", "--backends", "bogus"], ["argument --backends", "'reference', 'cpu', 'cuda', 'triton'"]),
    (["ops", "--device", "cpu", "--backends", "cuda"], ["argument --backends", "'cuda'"]),
    (["train", "--detectors", "bogus"], ["argument --detectors", "'retinanet'"]),
    (["train", "--methods", "bogus"], ["argument --methods", "'fgfi'"]),
    (["train", "--variants", "baseline", "--methods", "lgd"], ["argument --methods", "--variants"]),
    (["train", "--overrides", "lgd.distill_weight=2"], ["--overrides needs --methods"]),
])
def test_bad_argument_is_one_line(args, expected):
    """Exit code 2 and one line naming the argument and the valid values, no traceback."""
    proc = lgd_bench_process(*args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"lgd-bench {args[0]}: error: ") and all(e in lines[0] for e in expected), lines[0]
