"""The demo: the MobileNetV2 backbone (shapes, ImageNet weights by position, bad input) and lgd-demo end to end
on test_lgd_train_net's synthetic 4-image COCO dataset (64 px, 2 iterations, random backbone init): a run writes
summary.json and the plots and prints one line per evaluation, --resume reuses it, --compare adds the baseline and
the AP table; the library never imports lgd.demo."""
import contextlib
import io
import json
import logging
import os
import re
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

import torch

from lgd.demo.backbone import MOBILENETV2_STAGES, MobileNetV2Backbone, build_mobilenetv2_fpn, load_by_position
from lgd.modeling.norm import group_norm

pytest.importorskip("pycocotools")


def test_backbone_outputs_strides_8_16_32():
    backbone = MobileNetV2Backbone(out_features=["m5", "m3", "m4"], norm="BN")
    out = backbone(torch.randn(2, 3, 64, 96))
    shapes = backbone.output_shape()
    assert list(out) == ["m3", "m4", "m5"]
    for name, x in out.items():
        _, channels, stride = MOBILENETV2_STAGES[name]
        assert shapes[name].channels == channels and shapes[name].stride == stride
        assert tuple(x.shape) == (2, channels, 64 // stride, 96 // stride)
    assert len(backbone.features) == MOBILENETV2_STAGES["m5"][0] + 1  # the 1280-channel conv is dropped


def test_fpn_levels_for_retinanet():
    fpn = build_mobilenetv2_fpn(out_channels=16)
    out = fpn(torch.randn(1, 3, 64, 64))
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == {
        "p3": (16, 8, 8), "p4": (16, 4, 4), "p5": (16, 2, 2), "p6": (16, 1, 1), "p7": (16, 1, 1)}
    assert hasattr(fpn, "bottom_up")  # what LGDDistiller freezes


def test_frozen_bn_has_no_trainable_norms():
    from detectron2.layers import FrozenBatchNorm2d

    backbone = MobileNetV2Backbone(out_features=["m3"])
    assert any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())


def test_loads_real_imagenet_weights():
    from lgd.demo.assets import AssetsMissingError, mobilenetv2_weights_path

    try:
        path = mobilenetv2_weights_path()
    except AssetsMissingError:
        pytest.skip("MobileNetV2 weights not fetched (scripts/fetch_demo_assets.sh)")
    stored = list(torch.load(path, map_location="cpu", weights_only=True).values())
    backbone = MobileNetV2Backbone(weights=path, out_features=["m5"], norm="BN")
    loaded = list(backbone.features.state_dict().values())
    assert all(torch.equal(a, b) for a, b in zip(loaded, stored))  # same order, truncated after block 17
    frozen = MobileNetV2Backbone(weights=path, out_features=["m3"])
    first_bn = frozen.features[0][1]
    assert torch.equal(first_bn.running_mean, stored[3]) and torch.equal(first_bn.weight, stored[1])
    assert torch.isfinite(frozen(torch.rand(1, 3, 64, 64))["m3"]).all()


def test_demo_head_is_group_normalized():
    from detectron2.config import instantiate

    from lgd.demo.run import DEMO_CONFIG
    from lgd.config import load_config

    assert group_norm(64).num_groups == 32 and group_norm(1).num_groups == 1
    cfg = load_config(DEMO_CONFIG)
    cfg.model.backbone.weights = None
    head = instantiate(cfg.model).head
    norms = [m for m in head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 2 * len(cfg.model.head.conv_dims)  # one per conv of each tower (cls, box)
    with pytest.raises(ValueError, match="channels"):
        group_norm(0)


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="out_features"):
        MobileNetV2Backbone(out_features=["res5"])
    with pytest.raises(ValueError, match="norm"):
        MobileNetV2Backbone(norm="GN")
    features = MobileNetV2Backbone(out_features=["m2"], norm="BN").features
    state = features.state_dict()
    with pytest.raises(ValueError, match="tensors"):
        load_by_position(features, dict(list(state.items())[:-1]), source="short.pt")
    bad = dict(state)
    bad[next(iter(bad))] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        load_by_position(features, bad, source="bad.pt")
    truncated = tmp_path / "truncated.pt"
    torch.save(dict(list(state.items())), truncated)  # blocks 0-3 only: not a full features state dict
    with pytest.raises(ValueError, match="truncated.pt"):
        MobileNetV2Backbone(weights=str(truncated))


@pytest.fixture(scope="module")
def demo_argv(tmp_path_factory):
    from test_lgd_train_net import make_dataset

    root = tmp_path_factory.mktemp("lgd_demo")
    ann, images = make_dataset(root)
    out = str(root / "out")
    options = ["--output-dir", out, "--data", ann, ann, images, "--iters", "2", "--batch-size", "2",
               "--image-size", "128", "--workers", "0", "--no-pretrained"]
    # 128 px, not 64: with 64 px inputs P6 is 1x1, and a bf16 channels_last 3x3 stride-2 conv on a 1x1 map (P7)
    # gets garbage weight gradients from PyTorch 2.14's CPU kernel (benchmarks/README.md, "The fast path")
    # config overrides come last; after 2 iterations every score is ~prior_prob (0.01): keep them all
    return out, options, ["model.num_classes=2", "model.test_score_thresh=0.0"]


@pytest.fixture(scope="module")
def demo_run(demo_argv):
    """The demo's output folder, its summary and what it printed on stdout."""
    from lgd.tools.demo import run

    out, options, overrides = demo_argv
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        summary = run(options + overrides)
    return out, summary, console.getvalue()


def test_demo_writes_summary_and_plots(demo_run):
    out, summary, _ = demo_run
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["results"] == summary["results"]
    assert all(isinstance(summary["results"][k], float) for k in ("AP", "AP50"))
    assert set(summary["op_report"]) >= {"box_pool", "box_fill", "normalized_mse", "lgd_mem_share"}
    assert {"ms", "ref_ms", "speedup", "peak_mb", "ref_peak_mb"} <= set(summary["op_report"]["box_pool"])
    assert {"loss_cls", "loss_cls_tea", "loss_distill"} <= set(summary["final_losses"])
    (run,) = summary["runs"]
    assert run["mode"] == "lgd" and run["iterations"] == 2 and run["batch_size"] == 2
    for name in ("curves.png", "curves_lgd_seed0.png", "predictions.png", "lgd_seed0/run.json",
                 "lgd_seed0/model_final.pth"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert summary["predictions"]["methods"] == ["lgd"] and len(summary["predictions"]["tiles"]) == 4


def test_console_names_the_device_first_and_shows_one_line_per_evaluation(demo_run):
    """The console: the device and precision in the first lines, then one line per evaluation (2 iterations:
    after the first and at the end); pycocotools' printed summary goes to log.txt only."""
    out, _, console = demo_run
    lines = console.splitlines()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert lines[1].startswith(f"device: {device} (") and "precision: " in lines[1], lines[:2]
    evaluations = [line for line in lines if line.startswith("[lgd seed 0] iter ")]
    assert evaluations == [line for line in lines if " iter " in line and "AP" in line]  # no other AP lines
    assert [line.split(":")[0] for line in evaluations] == ["[lgd seed 0] iter 1/2", "[lgd seed 0] iter 2/2"]
    assert all(re.fullmatch(r".*: AP \d+\.\d\d AP50 \d+\.\d\d", line) for line in evaluations), evaluations
    assert "Average Precision" not in console and "Evaluate annotation type" not in console
    with open(os.path.join(out, "log.txt")) as f:
        log = f.read()
    assert log.count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]") >= 2
    assert log.count("[lgd seed 0] iter ") == 0  # the evaluation lines are the console's


def test_demo_config_runs_where_it_is_started(monkeypatch):
    """Without CUDA the demo config names the CPU itself, so no "CUDA is not available" fallback warning."""
    from lgd.config import load_config
    from lgd.demo.run import DEMO_CONFIG
    from lgd.runner import run_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config(DEMO_CONFIG)
    assert cfg.train.device == "cpu"
    warnings = []
    monkeypatch.setattr(logging.getLogger("lgd.runner.build"), "warning", lambda *a, **k: warnings.append(a))
    assert run_device(cfg) == "cpu" and warnings == []


LIBRARY_IMPORTS = """
import sys
import lgd, lgd.config, lgd.data, lgd.engine, lgd.evaluation, lgd.methods, lgd.modeling, lgd.runner
import lgd.tools.bench, lgd.tools.eval_net, lgd.tools.export, lgd.tools.train_net
print(sorted(m for m in sys.modules if m == "lgd.demo" or m.startswith("lgd.demo.")))
"""


def test_the_library_does_not_import_the_demo():
    """lgd.demo sits on top: importing the library and the other commands loads none of it, and no module of lgd
    outside lgd/demo/ and the lgd-demo command names it in an import."""
    import ast
    import subprocess
    import sys

    import lgd

    proc = subprocess.run([sys.executable, "-c", LIBRARY_IMPORTS], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
    root = Path(lgd.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[:2] == ("lgd", "demo") or parts == ("lgd", "tools", "demo"):
            continue
        package = list(parts[:-1])  # a module's package, or the package of an __init__
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                names = [module] + [f"{module}.{alias.name}" for alias in node.names]
            else:
                continue
            if any(n == "lgd.demo" or n.startswith("lgd.demo.") for n in names):
                offenders.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    assert offenders == []


def test_resume_reuses_finished_run_and_compare_adds_baseline(demo_argv, demo_run):
    from lgd.tools.demo import run

    out, options, overrides = demo_argv
    metrics = os.path.join(out, "lgd_seed0", "metrics.json")
    stamp = os.path.getmtime(metrics)
    summary = run(["--compare", "--seeds", "0", "--resume"] + options + overrides)
    assert os.path.getmtime(metrics) == stamp  # the LGD run was not trained again
    with open(os.path.join(out, "compare.json")) as f:
        table = json.load(f)["table"]
    assert set(table) == {"baseline", "lgd", "lgd - baseline"}
    assert table["lgd"]["AP"]["n"] == 1 and table["lgd"]["AP"]["std"] == 0.0
    diff = table["lgd - baseline"]["AP"]
    assert diff["n"] == 1 and diff["mean"] == table["lgd"]["AP"]["mean"] - table["baseline"]["AP"]["mean"]
    assert diff["above_2se"] is False  # one pair: no standard error, no claim
    assert summary["compare"]["baseline"]["AP50"]["per_seed"]
    assert os.path.getsize(os.path.join(out, "compare.png")) > 0
    assert summary["predictions"]["methods"] == ["baseline", "lgd"]  # one column each, the same tiles


def test_rerun_without_resume_refuses_to_replace_the_earlier_demo(demo_argv, demo_run, capsys):
    from lgd.tools.demo import main

    out, options, overrides = demo_argv
    run_dir = os.path.join(out, "lgd_seed0")
    before = {name: os.path.getmtime(os.path.join(run_dir, name)) for name in os.listdir(run_dir)}
    assert main(options + overrides) == 2  # neither --resume nor --overwrite
    error, hint = capsys.readouterr().err.splitlines()
    assert out in error and "--resume" in hint and "--overwrite" in hint
    assert {name: os.path.getmtime(os.path.join(run_dir, name)) for name in os.listdir(run_dir)} == before


def test_lgd_train_without_a_config_file_names_lgd_demo(capsys):
    """The demo is its own command: lgd-train without --config-file is a usage error pointing to lgd-demo."""
    from lgd.tools.train_net import main

    assert main(["train.max_iter=1"]) == 2
    error, hint = capsys.readouterr().err.splitlines()
    assert error.startswith("lgd-train: error: --config-file is required") and "lgd-demo" in hint


def test_console_script_restarts_once_with_passive_openmp(monkeypatch):
    """lgd-demo (argv None) re-executes itself with OMP_WAIT_POLICY=PASSIVE once; not when a policy is set,
    not after the restart, not for run(argv)/main(argv) callers."""
    from lgd.tools import demo

    calls = []
    monkeypatch.setattr(demo.os, "execve", lambda exe, args, env: calls.append((exe, args, env)))
    monkeypatch.setattr(demo.sys, "argv", ["lgd-demo", "--iters", "3"])
    monkeypatch.setattr(demo.torch.cuda, "is_available", lambda: False)
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "LGD_DEMO_OPENMP"):
        monkeypatch.delenv(name, raising=False)
    demo.passive_openmp(["--iters", "3"])
    assert calls == []
    demo.passive_openmp()
    (exe, args, env), = calls
    assert args[1:] == ["-m", "lgd.tools.demo", "--iters", "3"] and env["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("LGD_DEMO_OPENMP", "1")
    demo.passive_openmp()
    monkeypatch.delenv("LGD_DEMO_OPENMP")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    demo.passive_openmp()
    assert len(calls) == 1


def test_predictions_grid_draws_ground_truth_and_detections_in_two_colours(tmp_path):
    """plot_predictions: one panel per method and tile; at a true box's edge the ground-truth colour, at a
    detection's edge the detection colour, and nothing where a detection scores under the threshold."""
    import numpy as np
    from detectron2.structures import Boxes, BoxMode, Instances

    from lgd.demo.plots import GT_COLOR, PREDICTION_COLOR, plot_predictions

    background = 60
    image = np.full((100, 120, 3), background, np.uint8)
    tiles = [{"file_name": f"tile{i}.png", "annotations": [{"bbox": [10, 10, 20, 30], "bbox_mode": BoxMode.XYWH_ABS}]}
             for i in range(2)]

    def detections(score):
        instances = Instances((100, 120))
        instances.pred_boxes, instances.scores = Boxes(torch.tensor([[60.0, 50.0, 100.0, 90.0]])), torch.tensor([score])
        return instances

    predictions = {"baseline": [detections(0.9), detections(0.2)], "lgd": [detections(0.7), detections(0.95)]}
    panels = plot_predictions(tiles, [image, image], predictions, str(tmp_path / "predictions.png"))
    assert set(panels) == {(m, t) for m in ("baseline", "lgd") for t in (0, 1)}
    assert os.path.getsize(tmp_path / "predictions.png") > 0

    def near(pixel, color):  # the Visualizer draws box edges at alpha 0.5
        return np.abs(pixel.astype(float) - (0.5 * np.array(color) * 255 + 0.5 * background)).max() < 30

    for key, panel in panels.items():
        assert panel.shape == image.shape
        assert near(panel[10, 20], GT_COLOR) and near(panel[40, 10], GT_COLOR)  # top and left edges of the true box
        drawn = key != ("baseline", 1)  # score 0.2 < 0.5
        assert near(panel[50, 80], PREDICTION_COLOR) == drawn and near(panel[70, 100], PREDICTION_COLOR) == drawn
        assert (panel[50, 80] == background).all() != drawn
        assert (panel[95, 5] == background).all()  # away from every box


def _record(mode, seed, fold, ap):
    return {"mode": mode, "seed": seed, "fold": fold, "results": {"AP": ap, "AP50": None}}


def test_compare_table_pairs_runs_by_seed_and_fold_and_reports_standard_errors():
    from lgd.demo.report import compare_table, format_table

    base = [(0, 0, 5.0), (1, 1, 7.0), (2, 0, 6.0), (3, 1, 9.0)]
    lift = [1.0, 2.0, 0.0, 1.0]  # LGD - baseline per pair: mean 1, sample std sqrt(2/3), SE sqrt(2/3)/2
    records = [_record("baseline", s, f, ap) for s, f, ap in base]
    records += [_record("lgd", s, f, ap + d) for (s, f, ap), d in zip(base, lift)]
    records.append(_record("lgd", 4, 0, 8.0))  # no baseline partner: in the LGD row, not in the difference
    table = compare_table(records)
    assert table["baseline"]["AP"]["per_seed"] == {"0/fold0": 5.0, "1/fold1": 7.0, "2/fold0": 6.0, "3/fold1": 9.0}
    assert table["lgd"]["AP"]["n"] == 5
    diff = table["lgd - baseline"]["AP"]
    se = (2 / 3) ** 0.5 / 2
    assert diff["n"] == 4 and diff["mean"] == pytest.approx(1.0) and diff["se"] == pytest.approx(se)
    assert diff["above_2se"] is True  # 1.0 > 2 * 0.408
    assert table["lgd - baseline"]["AP50"]["n"] == 0 and table["lgd - baseline"]["AP50"]["above_2se"] is False
    records[-2]["results"]["AP"] = 15.0  # a wide spread: the mean lift no longer clears 2 SE
    assert compare_table(records)["lgd - baseline"]["AP"]["above_2se"] is False
    text = format_table(table)
    assert "AP above 2 SE" in text and "AP50 NOT above 2 SE" in text and "+1.00 ± 0.41 (n=4)" in text


def test_folds_hold_out_each_source_image(tmp_path):
    from lgd.demo import deepforest
    from lgd.demo.deepforest import DEMO_FOLDS
    from lgd.demo.run import run_name

    assert deepforest.DEMO_FOLDS[0] == deepforest.DEMO_VAL_IMAGES[0]  # fold 0 is the fixed split
    assert len(set(DEMO_FOLDS)) == 4
    assert deepforest.demo_dataset_names(None) == (deepforest.DEMO_TRAIN, deepforest.DEMO_VAL)
    assert deepforest.demo_dataset_names(2) == ("lgd_demo_fold2_train", "lgd_demo_fold2_val")
    for bad in (-1, 4, 1.0, "1"):
        with pytest.raises(ValueError, match="fold must be an integer in"):
            deepforest.demo_dataset_names(bad)
    assert run_name("lgd", 3) == "lgd_seed3" and run_name("baseline", 3, 1) == "baseline_seed3_fold1"


@pytest.mark.parametrize("extra, message", [
    (["--folds", "4"], "--folds: each fold must be in [0, 4)"),
    (["--folds", "0", "--data", "a.json", "b.json", "img"], "--folds splits the demo's deepforest images"),
])
def test_bad_folds_are_usage_errors(tmp_path, capsys, extra, message):
    from lgd.tools.demo import main

    assert main(["--output-dir", str(tmp_path / "out")] + extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_folds_rotate_over_the_seeds_on_the_demo_data(tmp_path):
    from lgd.tools.demo import run

    out = str(tmp_path / "out")
    summary = run(["--output-dir", out, "--seeds", "0", "1", "--folds", "2", "3", "--iters", "1", "--batch-size", "1",
                   "--image-size", "128", "--workers", "0", "--no-pretrained", "model.test_score_thresh=0.0"])
    runs = {(r["seed"], r["fold"]): r["datasets"]["val"] for r in summary["runs"]}
    assert runs == {(0, 2): "lgd_demo_fold2_val", (1, 3): "lgd_demo_fold3_val"}
    assert set(summary["datasets"]) == {"fold2", "fold3"}
    for name in ("lgd_seed0_fold2/run.json", "lgd_seed1_fold3/run.json", "curves_lgd_seed1_fold3.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name


def test_methods_compare_any_training_methods_with_their_costs(demo_argv):
    """--methods runs each method on the same seeds and budget; stages train inside the run and count in its cost."""
    from lgd.tools.demo import run

    out, options, overrides = demo_argv
    out = out + "_methods"
    options = [out if o == demo_argv[0] else o for o in options]
    summary = run(["--methods", "baseline", "fgfi", "labelenc"] + options + overrides)
    assert [r["mode"] for r in summary["runs"]] == ["baseline", "fgfi", "labelenc"] * 3  # seeds 0 1 2
    assert summary["method"] == "fgfi"  # no LGD run: the first other method is summarised
    assert {"fgfi - baseline", "labelenc - baseline"} <= set(summary["compare"])
    cost = summary["cost"]
    assert cost["baseline"]["stages"] == [] and cost["baseline"]["vs_baseline"] == 1.0
    assert cost["fgfi"]["stages"] == ["teacher"] and cost["labelenc"]["stages"] == ["labelenc_step1"]
    for run_record in summary["runs"]:
        stages = sum(run_record["stages_wall_s"].values())
        assert run_record["total_wall_s"] >= stages > 0 or run_record["mode"] == "baseline"
        assert os.path.isfile(os.path.join(run_record["run_dir"], "cost.json"))
    assert os.path.isdir(os.path.join(out, "fgfi_seed0", "teacher"))
    with open(os.path.join(out, "compare.json")) as f:
        assert json.load(f)["methods"] == ["baseline", "fgfi", "labelenc"]


def test_unknown_method_is_a_usage_error(tmp_path, capsys):
    from lgd.tools.demo import main

    assert main(["--methods", "lgd", "kd", "--output-dir", str(tmp_path / "out")]) == 2
    assert "--methods: unknown ['kd']" in capsys.readouterr().err
    assert main(["--methods", "baseline", "tfkd", "--output-dir", str(tmp_path / "out")]) == 2
    assert "tfkd (tf-KD_reg) is defined for R-CNN" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
