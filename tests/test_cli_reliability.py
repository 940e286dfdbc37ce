"""The commands as users meet them (lgd.tools.cli): exit status 0 / 2 / 1, one failure line naming the file, key or
argument (no traceback without --debug), never clobbering an earlier run or file, strict config keys, checkpoints
that must fit, datasets validated before anything is written, checkpoint files (temporaries, mode), seeded init.

Command-line behaviour runs the console scripts' entry points in subprocesses (ENTRY_POINTS, checked against
setup.py) on test_lgd_train_net's synthetic 4-image dataset and tiny config, 1 iteration; the failure paths stop
before training. The rest calls the same functions in this process."""
import contextlib
import json
import logging
import os
import re
import stat
import subprocess
import sys

import pytest
import torch

pytest.importorskip("detectron2")
pytest.importorskip("pycocotools")

from lgd.errors import UsageError  # noqa: E402
from lgd.tools.cli import run_command  # noqa: E402
from test_lgd_train_net import DATASET, ROOT, argv, make_setup, overrides, read_metrics  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))
ENTRY_POINTS = {"lgd-train": "lgd.tools.train_net:main", "lgd-eval": "lgd.tools.eval_net:main",
                "lgd-export": "lgd.tools.export:main", "lgd-demo": "lgd.tools.demo:main"}


def command(name, *args, env=None, timeout=240):
    """Runs console script `name` as its wrapper does (sys.exit(entry())) in a fresh process."""
    module, func = ENTRY_POINTS[name].split(":")
    code = f"import sys; from {module} import {func}; sys.argv[0] = {name!r}; sys.exit({func}())"
    full_env = {k: v for k, v in os.environ.items() if k != "LGD_DEBUG"}
    path = [TESTS, ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    full_env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(path), **(env or {}))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=TESTS,
                          env=full_env, timeout=timeout)


def failure_lines(proc, prog):
    """stderr of a failed command: one error line (plus an optional hint line), no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert 1 <= len(lines) <= 2, proc.stderr
    assert lines[0].startswith(f"{prog}: error: "), proc.stderr
    assert len(lines) == 1 or lines[1].startswith(f"{prog}: hint: "), proc.stderr
    return lines


def train_args(cfg_file, out, train_spec, test_spec, *extra):
    """lgd-train's arguments for 1 iteration of the tiny config on the given datasets."""
    return ["--config-file", cfg_file, "--ops", "reference", "--train-dataset", train_spec, "--test-dataset",
            test_spec, *extra, *[o for o in overrides(out, 1) if "dataset.names" not in o]]


def snapshot(directory):
    return {name: os.path.getmtime(os.path.join(directory, name)) for name in os.listdir(directory)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("lgd_cli"))


def test_entry_points_are_setup_pys():
    with open(os.path.join(ROOT, "setup.py")) as f:
        text = f.read()
    for name, target in ENTRY_POINTS.items():
        assert f'"{name}={target}"' in text, name


@pytest.fixture(scope="module")
def trained(setup):
    """lgd-train (subprocess), 1 iteration: exit status 0, no dump."""
    root, cfg_file, ann, images = setup
    out = str(root / "run")
    proc = command("lgd-train", *argv(cfg_file, ann, images, out, max_iter=1))
    return out, proc


def test_train_success_exits_0(trained):
    out, proc = trained
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "error" not in proc.stderr.lower()
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    mode = stat.S_IMODE(os.stat(os.path.join(out, "model_final.pth")).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # not mkstemp's 0600


def test_eval_and_export_success_exit_0_without_dump(setup, trained, tmp_path):
    root, cfg_file, ann, images = setup
    out, _ = trained
    final = os.path.join(out, "model_final.pth")
    spec = f"{DATASET}={ann}:{images}"
    proc = command("lgd-eval", "--config-file", cfg_file, "--checkpoint", final, "--test-dataset", spec,
                   "train.device=cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    exported = str(tmp_path / "student.pth")
    proc = command("lgd-export", "--config-file", cfg_file, "--checkpoint", final, "--output", exported)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stderr) < 2000 and "tensor(" not in proc.stderr + proc.stdout  # no state_dict dumped
    assert os.path.isfile(exported)


def test_unknown_config_key_is_a_usage_error(setup, tmp_path):
    root, cfg_file, ann, images = setup
    out = str(tmp_path / "typo")
    proc = command("lgd-train", *argv(cfg_file, ann, images, out, "trian.max_iter=2", max_iter=1))
    assert proc.returncode == 2
    error, hint = failure_lines(proc, "lgd-train")
    assert "'trian.max_iter'" in error and "train.max_iter" in hint
    assert not os.path.exists(out)


def test_train_refuses_a_non_empty_output_dir(setup, trained):
    root, cfg_file, ann, images = setup
    out, _ = trained
    before = snapshot(out)
    with open(os.path.join(out, "config.yaml")) as f:
        config = f.read()
    proc = command("lgd-train", *argv(cfg_file, ann, images, out, max_iter=1))
    assert proc.returncode == 2
    error, hint = failure_lines(proc, "lgd-train")
    assert out in error and "--resume" in hint and "--overwrite" in hint
    assert snapshot(out) == before
    with open(os.path.join(out, "config.yaml")) as f:
        assert f.read() == config


def test_missing_image_fails_before_writing(setup, tmp_path):
    root, cfg_file, ann, images = setup
    with open(ann) as f:
        data = json.load(f)
    data["images"][2]["file_name"] = "gone.png"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    out = tmp_path / "out"
    proc = command("lgd-train", *train_args(cfg_file, str(out), f"lgd_cli_bad={bad}:{images}",
                                            f"lgd_cli_val={ann}:{images}"))
    assert proc.returncode == 1
    (error, *_) = failure_lines(proc, "lgd-train")
    assert "gone.png" in error and str(bad) in error
    assert not out.exists()


def test_export_refuses_its_own_input(setup, trained):
    _, cfg_file, _, _ = setup
    final = os.path.join(trained[0], "model_final.pth")
    stamp = os.path.getmtime(final)
    proc = command("lgd-export", "--config-file", cfg_file, "--checkpoint", final, "--output", final)
    assert proc.returncode == 2
    error, hint = failure_lines(proc, "lgd-export")
    assert final in error and "--overwrite" in hint
    assert os.path.getmtime(final) == stamp


def test_eval_garbage_checkpoint_is_one_line_and_debug_shows_traceback(setup, tmp_path):
    _, cfg_file, ann, images = setup
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"e" * 100)  # once: KeyError: 101
    args = ["--config-file", cfg_file, "--checkpoint", str(garbage), "--test-dataset", f"{DATASET}={ann}:{images}",
            "train.device=cpu"]
    proc = command("lgd-eval", *args)
    assert proc.returncode == 1
    (error, *_) = failure_lines(proc, "lgd-eval")
    assert str(garbage) in error
    debug = command("lgd-eval", *args, env={"LGD_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_demo_entry_usage_error():
    proc = command("lgd-demo", "--iters", "0")
    assert proc.returncode == 2
    (error, *_) = failure_lines(proc, "lgd-demo")
    assert "--iters" in error


@pytest.mark.parametrize("name", ["lgd-train", "lgd-demo"])
def test_ops_takes_lgd_ops_backend_names(name):
    """One vocabulary for backends: --ops takes lgd_ops' names; anything else is a one-line usage error."""
    proc = command(name, "--ops", "fused")
    assert proc.returncode == 2
    (error, *_) = failure_lines(proc, name)
    assert "--ops" in error and "'fused'" in error and "reference" in error


def test_lgd_train_without_config_points_to_the_demo():
    proc = command("lgd-train", "train.max_iter=1")
    assert proc.returncode == 2
    error, hint = failure_lines(proc, "lgd-train")
    assert "--config-file" in error and "lgd-demo" in hint


# ---------------------------------------------------------------------------------------------------------
# the same functions, in this process
# ---------------------------------------------------------------------------------------------------------

def test_run_command_statuses(capsys):
    def fails(exc):
        def api(argv):
            raise exc
        return api

    assert run_command("x", lambda argv: {"big": "dict"}, []) == 0
    assert capsys.readouterr().err == ""
    assert run_command("x", fails(UsageError("bad --flag", hint="use --other")), []) == 2
    assert capsys.readouterr().err.splitlines() == ["x: error: bad --flag", "x: hint: use --other"]
    assert run_command("x", fails(FileNotFoundError("file not found: a.json")), ["--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1] == "x: error: file not found: a.json"
    assert run_command("x", fails(RuntimeError("boom\nmore")), []) == 1
    assert capsys.readouterr().err.splitlines()[0] == "x: error: RuntimeError: boom more"


def test_strict_overrides(setup):
    from lgd.config import load_config

    _, cfg_file, _, _ = setup
    with pytest.raises(UsageError, match="'lgd.methd'") as info:
        load_config(cfg_file, ["lgd.methd=baseline"])
    assert "lgd.method" in info.value.hint
    cfg = load_config(cfg_file, ["model.test_score_thresh=0.0", "train.seed=3", "+extra.note=1",
                                 "dataloader.train.mapper.augmentations.0.horizontal=False"])
    assert cfg.model.test_score_thresh == 0.0 and cfg.train.seed == 3 and cfg.extra.note == 1
    with pytest.raises(UsageError, match="not KEY=VALUE"):
        load_config(cfg_file, ["train.max_iter"])
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_config("nope.py")


@pytest.mark.parametrize("override, moved_to", [
    ("lgd.enabled=False", "the baseline is lgd.method=baseline"), ("+lgd.enabled=False", "lgd.method=baseline"),
    ("lgd.precision=fp16", "moved to train.amp.precision"), ("lgd.channels_last=True", "train.amp.channels_last"),
    ("lgd.clip_type=norm", "moved to train.clip_gradients.clip_type"),
    ("lgd.clip_value=2.0", "moved to train.clip_gradients.clip_value"),
])
def test_removed_keys_name_their_replacement(override, moved_to):
    """A removed key, as an override or set in a config, is one line naming where its setting went."""
    from lgd.config import load_config
    from lgd.methods import build_method

    config = os.path.join(ROOT, "lgd", "configs", "retinanet_R_50_FPN_1x_lgd.py")
    with pytest.raises(UsageError, match=re.escape(moved_to)) as info:
        load_config(config, [override])
    assert "\n" not in str(info.value) and info.value.hint is None
    cfg = load_config(config)
    key, _, value = override.lstrip("+").partition("=")
    cfg.lgd[key.split(".")[1]] = value
    with pytest.raises(UsageError, match=re.escape(f"{key} ") + ".*" + re.escape(moved_to)):
        build_method(cfg)


@pytest.mark.parametrize("change, message", [
    ("corrupt", "not valid JSON"),
    ({"images": []}, "'images' is empty"),
    ({"categories": []}, "'categories' is empty"),
    ("no_annotations", "no 'annotations'"),
    ({"annotations": [{"id": 1, "image_id": 1, "category_id": 9, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}]},
     "category_id 9"),
    ({"annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, "x", 5], "area": 5, "iscrowd": 0}]},
     "4 finite numbers"),
    ("missing_json", "annotation file not found"),
])
def test_dataset_validation_names_the_problem(setup, tmp_path, change, message):
    from lgd.data.register import DatasetError, validate_coco_json

    _, _, ann, images = setup
    path = tmp_path / "ann.json"
    if change == "corrupt":
        path.write_text('{"images": [')
    elif change == "missing_json":
        path = tmp_path / "absent.json"
    else:
        with open(ann) as f:
            data = json.load(f)
        if change == "no_annotations":
            del data["annotations"]
        else:
            data.update(change)
        path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=re.escape(message)) as info:
        validate_coco_json(str(path), images, training=True)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_unregistered_dataset_names_the_closest():
    from lgd.data.register import DatasetError, validate_dataset

    with pytest.raises(DatasetError, match="dataloader.train.dataset.names: dataset 'coco_2017_trian' is not") as info:
        validate_dataset("coco_2017_trian", where="dataloader.train.dataset.names", training=True)
    assert "coco_2017_train" in info.value.hint


@contextlib.contextmanager
def lgd_data_warnings():
    """The warnings logged on lgd.data, by a handler of our own: detectron2's setup_logger (run by earlier
    tests in the process) stops their propagation to pytest's caplog."""
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("lgd.data").addHandler(handler)
    try:
        yield warnings
    finally:
        logging.getLogger("lgd.data").removeHandler(handler)


def test_degenerate_boxes_are_dropped_with_a_warning(setup, tmp_path):
    from detectron2.structures import BoxMode

    from lgd.data.register import drop_degenerate_boxes, validate_coco_json

    _, _, ann, images = setup
    with open(ann) as f:
        data = json.load(f)
    data["annotations"][0]["bbox"][2] = -5  # image 1's only box
    path = tmp_path / "neg.json"
    path.write_text(json.dumps(data))
    with lgd_data_warnings() as warnings:
        stats = validate_coco_json(str(path), images, training=True)
    assert stats["degenerate_boxes"] == 1 and any("1 of 6 boxes" in w for w in warnings)
    dicts = [{"annotations": [{"bbox": [0, 0, -5, 3], "bbox_mode": BoxMode.XYWH_ABS}]},
             {"annotations": [{"bbox": [0, 0, 4, 3], "bbox_mode": BoxMode.XYWH_ABS},
                              {"bbox": [5, 0, 4, 3], "bbox_mode": BoxMode.XYXY_ABS}]}]
    kept, boxes, dropped_images = drop_degenerate_boxes(dicts)
    assert (boxes, dropped_images) == (2, 1) and len(kept) == 1 and len(kept[0]["annotations"]) == 1

    from lgd.data import register_coco_once
    from lgd.config import load_config
    from lgd.runner import build_train_loader

    _, cfg_file, _, _ = setup
    cfg = load_config(cfg_file, ["dataloader.train.dataset.names=lgd_cli_negative"])
    register_coco_once("lgd_cli_negative", str(path), images)
    with lgd_data_warnings() as warnings:
        build_train_loader(cfg)  # the training loader applies the rule
    assert any("dropped 1 boxes with a width or height <= 0, 0 entirely outside their image and 1 images" in w
               for w in warnings)


def test_failed_run_leaves_an_earlier_run_untouched(setup, tmp_path, capsys):
    """An empty training dataset fails before config.yaml (or anything) is written: --overwrite included."""
    from lgd.tools.train_net import main

    root, cfg_file, ann, images = setup
    out = tmp_path / "earlier"
    out.mkdir()
    (out / "config.yaml").write_text("earlier: run\n")
    (out / "model_final.pth").write_bytes(b"weights")
    with open(ann) as f:
        data = json.load(f)
    data["images"], data["annotations"] = [], []
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps(data))
    assert main(train_args(cfg_file, str(out), f"lgd_cli_empty={empty}:{images}", f"lgd_cli_val={ann}:{images}",
                           "--overwrite")) == 1
    err = capsys.readouterr().err
    assert "'images' is empty" in err and str(empty) in err
    assert (out / "config.yaml").read_text() == "earlier: run\n"
    assert (out / "model_final.pth").read_bytes() == b"weights"


def test_overwrite_removes_the_earlier_runs_files(tmp_path):
    from lgd.runner import check_output_dir
    from lgd.runner.checks import remove_run_files

    for name in ("model_0000099.pth", "metrics.json", "last_checkpoint", "config.yaml", "notes.txt",
                 ".model_0000001.pth.abc.lgd-tmp"):
        (tmp_path / name).write_text("x")
    with pytest.raises(UsageError, match="not empty"):
        check_output_dir(str(tmp_path))
    with pytest.raises(UsageError, match="contradict"):
        check_output_dir(str(tmp_path), resume=True, overwrite=True)
    assert check_output_dir(str(tmp_path), resume=True) == []
    remove_run_files(check_output_dir(str(tmp_path), overwrite=True))
    assert os.listdir(tmp_path) == ["notes.txt"]  # not a run's file: kept


@pytest.fixture(scope="module")
def lgd_checkpoint(setup):
    """An LGD checkpoint of the tiny config (the untrained model), and the config."""
    from lgd.engine.checkpoint import AtomicCheckpointer
    from lgd.config import load_config
    from lgd.methods import build_method
    from lgd.runner import build_model

    root, cfg_file, _, _ = setup
    cfg = load_config(cfg_file, ["train.device=cpu"])
    AtomicCheckpointer(build_model(cfg, build_method(cfg, "lgd", backend="reference")), str(root)).save("init")
    return str(root / "init.pth"), cfg_file


def eval_args(setup, checkpoint, *extra):
    _, cfg_file, ann, images = setup
    return ["--config-file", cfg_file, "--checkpoint", checkpoint, "--test-dataset", f"{DATASET}={ann}:{images}",
            *extra, "train.device=cpu"]


def test_eval_refuses_checkpoints_that_do_not_fit(setup, lgd_checkpoint, tmp_path, capsys):
    from lgd.tools.eval_net import main as eval_main, run as eval_run

    path, _ = lgd_checkpoint
    foo = tmp_path / "foo.pth"
    torch.save({"model": {"foo": torch.zeros(1)}}, foo)
    assert eval_main(eval_args(setup, str(foo))) == 1
    err = capsys.readouterr().err
    assert str(foo) in err and "missing" in err and "--allow-partial" in err
    assert eval_main(eval_args(setup, path, "model.num_classes=3")) == 1  # another classifier shape
    err = capsys.readouterr().err
    assert "another shape" in err and "cls_score" in err
    truncated = tmp_path / "truncated.pth"
    with open(path, "rb") as f:
        truncated.write_bytes(f.read()[:5000])
    assert eval_main(eval_args(setup, str(truncated))) == 1
    assert str(truncated) in capsys.readouterr().err
    results = eval_run(eval_args(setup, str(foo), "--allow-partial"))  # evaluates anyway
    assert "bbox" in results


def test_export_refuses_an_existing_output(setup, lgd_checkpoint, tmp_path, capsys):
    from lgd.tools.export import main, run

    path, cfg_file = lgd_checkpoint
    target = tmp_path / "student.pth"
    target.write_bytes(b"keep")
    assert main(["--config-file", cfg_file, "--checkpoint", path, "--output", str(target)]) == 2
    assert target.read_bytes() == b"keep" and str(target) in capsys.readouterr().err
    state = run(["--config-file", cfg_file, "--checkpoint", path, "--output", str(target), "--overwrite"])
    assert torch.load(target)["model"].keys() == state.keys()


def test_atomic_write_mode_and_stale_temporaries(tmp_path):
    from lgd.engine.checkpoint import atomic_write, remove_stale_temporaries

    old = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / "a.pth"), lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.pth").st_mode) == 0o644
    stale = [".model_0000004.pth.k2j3.lgd-tmp", ".last_checkpoint.q1.lgd-tmp"]
    for name in stale:
        (tmp_path / name).write_bytes(b"half")
    (tmp_path / "keep.tmp").write_bytes(b"not ours")
    assert sorted(os.path.basename(p) for p in remove_stale_temporaries(str(tmp_path))) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == ["a.pth", "keep.tmp"]


def test_resume_removes_stale_temporaries_and_same_seed_same_start(setup, tmp_path):
    """train() removes an interrupted write's temporary at its start; two runs without train.seed (default 0)
    start from the same weights: the same losses at iteration 0."""
    from lgd.config import load_config
    from lgd.runner import train

    root, cfg_file, ann, images = setup
    from lgd.data import register_coco_once

    register_coco_once(DATASET, ann, images)
    losses = []
    for name in ("a", "b"):
        out = tmp_path / name
        out.mkdir()
        (out / ".model_0000000.pth.x1y2.lgd-tmp").write_bytes(b"half")
        cfg = load_config(cfg_file, [f"train.output_dir={out}", "train.max_iter=1", "train.eval_period=0",
                                     "train.device=cpu", "train.log_period=1",
                                     f"dataloader.train.dataset.names={DATASET}"])
        cfg.dataloader.evaluator = None
        torch.manual_seed(len(losses) + 10)  # a different global RNG state before each run
        train(cfg, backend="reference", resume=True)
        assert not [f for f in os.listdir(out) if f.endswith("tmp")]
        losses.append({k: v for k, v in read_metrics(str(out))[0].items() if k.startswith("loss_")})
    assert losses[0] and losses[0] == losses[1]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_bad_image_is_one_line_naming_the_file(setup, tmp_path, damage):
    """A garbage file fails the check before anything is written; a truncated one (its header intact) fails
    when training decodes it, naming the file, the dataset and the image id."""
    import shutil

    root, cfg_file, ann, images = setup
    copy = tmp_path / "images"
    shutil.copytree(images, copy)
    for path in copy.iterdir():
        data = path.read_bytes()
        path.write_bytes(b"garbage" * 50 if damage == "garbage" else data[: len(data) // 2])
    out = tmp_path / "out"
    proc = command("lgd-train", *train_args(cfg_file, str(out), f"lgd_cli_damaged={ann}:{copy}",
                                            f"lgd_cli_val={ann}:{images}"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("lgd-train: error: ")]
    assert str(copy) in error and "image id" in error and "<_io" not in error, error
    if damage == "garbage":
        assert "not an image PIL can read" in error and not out.exists()
    else:
        assert "dataset lgd_cli_damaged" in error and "truncated" in error, error
