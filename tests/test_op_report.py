"""lgd.engine.op_report.OpReport: a short tiny training run (test_lgd_distiller's RetinaNet, CPU) logs the op-report
scalars on report iterations only, through detectron2's JSONWriter; period 0 logs nothing; lgd-train registers
it. Times are not asserted."""
import itertools
import json
import math

import pytest

pytest.importorskip("detectron2")

import torch
from detectron2.engine import SimpleTrainer, hooks
from detectron2.utils.events import JSONWriter

import lgd_ops
from lgd.engine.op_report import OPS, OpReport, time_lgd_ops
from lgd.engine.optim import build_lgd_optimizer
from test_lgd_distiller import make_batch, make_distiller

KEYS = {f"op_report/{op}_{k}" for op in OPS for k in ("ms", "ref_ms", "speedup", "peak_mb", "ref_peak_mb")} | {
    "op_report/lgd_fwd_ms", "op_report/step_ms", "op_report/lgd_fwd_share", "op_report/lgd_saved_mb",
    "op_report/step_saved_mb", "op_report/lgd_mem_share"}


def train(tmp_path, period, max_iter=3):
    backend = "cpu" if "cpu" in lgd_ops.available_backends() else "reference"
    model = make_distiller(backend=backend)
    trainer = SimpleTrainer(model, itertools.repeat(make_batch()), build_lgd_optimizer(model, lr=0.001))
    trainer.register_hooks([OpReport(period=period, repeats=1),
                            hooks.PeriodicWriter([JSONWriter(str(tmp_path / "metrics.json"))], period=1)])
    trainer.train(0, max_iter)
    with open(tmp_path / "metrics.json") as f:
        return [json.loads(line) for line in f]


def test_report_iterations_log_the_scalars(tmp_path):
    rows = train(tmp_path, period=2)
    reported = [r["iteration"] for r in rows if KEYS <= set(r)]
    assert reported == [1]  # (iter + 1) % period == 0
    row = next(r for r in rows if r["iteration"] == 1)
    assert all(math.isfinite(row[k]) and row[k] >= 0 for k in KEYS), {k: row[k] for k in KEYS if not row[k] >= 0}
    assert 0 < row["op_report/lgd_fwd_share"] < 1
    assert 0 < row["op_report/lgd_mem_share"] < 1 and row["op_report/lgd_saved_mb"] < row["op_report/step_saved_mb"]
    assert not any(k.startswith("op_report/") for r in rows if r["iteration"] != 1 for k in r)


def test_period_zero_disables(tmp_path):
    rows = train(tmp_path, period=0, max_iter=1)
    assert rows and not any(k.startswith("op_report/") for r in rows for k in r)


def test_time_lgd_ops_reference_and_bad_input():
    levels = [torch.randn(2, 4, 8, 10), torch.randn(2, 4, 4, 5)]
    boxes = torch.tensor([[0.0, 0.0, 30.0, 20.0], [10.0, 5.0, 60.0, 50.0]])
    report = time_lgd_ops(levels, boxes, torch.tensor([0, 1]), (64, 80), backend="reference", repeats=1)
    assert set(report) == set(OPS)
    assert all(r["backend"] == "reference" and r["speedup"] == 1.0 for r in report.values())
    with_memory = time_lgd_ops(levels, boxes, torch.tensor([0, 1]), (64, 80), backend="reference", repeats=1,
                               memory=True)
    assert all(r["peak_mb"] >= 0 and r["ref_peak_mb"] == r["peak_mb"] for r in with_memory.values())
    with pytest.raises(ValueError, match="levels"):
        time_lgd_ops([], boxes, torch.tensor([0, 1]), (64, 80))
    with pytest.raises(ValueError, match="repeats"):
        OpReport(period=10, repeats=0)
    with pytest.raises(ValueError, match="period"):
        OpReport(period=-1)


def test_lgd_train_registers_the_report(tmp_path):
    """lgd-train (test_lgd_train_net's tiny config and dataset) puts the op-report scalars into metrics.json."""
    from test_lgd_train_net import LGD_CONFIG, TINY_CONFIG, argv, make_dataset, read_metrics, run

    ann, images = make_dataset(tmp_path)
    cfg_file = tmp_path / "tiny_lgd.py"
    cfg_file.write_text(TINY_CONFIG.format(config=LGD_CONFIG))
    out = str(tmp_path / "run")
    run(argv(str(cfg_file), ann, images, out, "lgd.op_report_period=2", max_iter=2))
    assert [r["iteration"] for r in read_metrics(out) if KEYS <= set(r)] == [1]
