"""lgd-predict on the demo's small model (MobileNetV2 RetinaNet, random init, 128 px) and test_lgd_train_net's
synthetic 4-image COCO dataset, in seconds on CPU: the drawn PNG changes at a detected box, predictions.json loads
with pycocotools' loadRes, a folder with a corrupt file is predicted with that file named and counted, an earlier
output is kept without --overwrite, a checkpoint that does not fit the config is refused before any image is read,
and lgd-export's student file predicts as the run's checkpoint does."""
import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("detectron2")
pytest.importorskip("pycocotools")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

DATASET = "lgd_test_synth"


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    """(root, config.yaml, the run's checkpoint, lgd-export's student file, dataset json, image folder)."""
    from detectron2.config import LazyConfig
    from detectron2.data import transforms as T
    from detectron2.config import LazyCall as L
    from test_lgd_train_net import make_dataset

    from lgd.config import load_config
    from lgd.demo.run import DEMO_CONFIG
    from lgd.runner import build_model, export_student
    from lgd.data.register import register_coco_by_path

    root = tmp_path_factory.mktemp("lgd_predict")
    ann, images = make_dataset(root)
    register_coco_by_path(f"{DATASET}={ann}:{images}")
    cfg = load_config(DEMO_CONFIG)
    cfg.model.backbone.weights = None
    cfg.model.num_classes = 2
    cfg.model.test_score_thresh = 0.0  # untrained: every score is ~prior_prob (0.01); keep them
    cfg.train.device = "cpu"
    cfg.train.amp.enabled = False
    cfg.dataloader.test.dataset.names = cfg.dataloader.train.dataset.names = DATASET
    size = L(T.ResizeShortestEdge)(short_edge_length=128, max_size=128)
    cfg.dataloader.test.mapper.augmentations = [size]
    cfg.dataloader.train.mapper.augmentations = [size]
    torch.manual_seed(0)
    model = build_model(cfg)
    checkpoint = str(root / "model_final.pth")
    torch.save({"model": model.state_dict(), "iteration": 0}, checkpoint)
    config_file = str(root / "config.yaml")
    LazyConfig.save(cfg, config_file)
    student = str(root / "student.pth")
    export_student(load_config(config_file), checkpoint, student)
    return root, config_file, checkpoint, student, ann, images


def predict(demo_model, inputs, output, *extra, checkpoint=None):
    from lgd.tools.predict import run

    root, config_file, run_checkpoint, _, ann, images = demo_model
    return run(["--config-file", config_file, "--checkpoint", checkpoint or run_checkpoint, "--input", *inputs,
                "--output", str(output), "--confidence-threshold", "0", *extra, f"--dataset={DATASET}={ann}:{images}"])


def _load(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_drawn_png_changes_at_a_predicted_box(demo_model, tmp_path):
    images = demo_model[5]
    summary = predict(demo_model, [os.path.join(images, "img1.png")], tmp_path / "out")
    assert summary["images"] == 1 and summary["skipped"] == [] and summary["detections"] > 0
    with open(tmp_path / "out" / "predictions.json") as f:
        rows = json.load(f)
    best = max(rows, key=lambda r: r["score"])
    drawn, source = _load(tmp_path / "out" / "img1.png"), _load(os.path.join(images, "img1.png"))
    assert drawn.shape == source.shape
    x, y, w, h = best["bbox"]
    # the top box's outline: Visualizer's line is centred on the edge, a pixel or more wide
    edge = [(int(round(y)), int(np.clip(x + w / 2, 0, source.shape[1] - 1))),
            (int(np.clip(y + h / 2, 0, source.shape[0] - 1)), int(round(x)))]
    edge = [(min(r, source.shape[0] - 1), min(c, source.shape[1] - 1)) for r, c in edge]
    assert any(np.abs(drawn[r, c] - source[r, c]).sum() > 30 for r, c in edge), edge


def test_predictions_json_loads_with_pycocotools(demo_model, tmp_path):
    from pycocotools.coco import COCO

    ann, images = demo_model[4], demo_model[5]
    summary = predict(demo_model, [images], tmp_path / "out", "--batch-size", "3")
    assert summary["images"] == 4
    with open(ann) as f:
        gt = json.load(f)
    coco = COCO(ann)
    dt = coco.loadRes(str(tmp_path / "out" / "predictions.json"))  # asserts the ids are the json's images
    names = {img["id"]: img["file_name"] for img in gt["images"]}
    rows = dt.loadAnns(dt.getAnnIds())
    assert rows and {r["image_id"] for r in rows} <= set(names)
    for row in rows:
        assert os.path.basename(row["file_name"]) == names[row["image_id"]]
        assert row["category_id"] in {1, 2} and 0 <= row["score"] <= 1
        x, y, w, h = row["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 128.01 and y + h <= 96.01  # input pixels
    assert sorted(os.listdir(tmp_path / "out")) == ["img0.png", "img1.png", "img2.png", "img3.png",
                                                    "predictions.json"]


def test_a_corrupt_file_in_a_folder_is_named_counted_and_skipped(demo_model, tmp_path, capsys):
    from lgd.tools.predict import main

    images = tmp_path / "images"
    shutil.copytree(demo_model[5], images)
    (images / "broken.png").write_bytes(open(images / "img0.png", "rb").read()[:60])  # a truncated PNG
    (images / "notes.txt").write_text("not an image")
    root, config_file, checkpoint = demo_model[:3]
    assert main(["--config-file", config_file, "--checkpoint", checkpoint, "--input", str(images),
                 "--output", str(tmp_path / "out"), "--confidence-threshold", "0.0"]) == 0
    captured = capsys.readouterr()
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped ")]
    assert [line.split(":")[0] for line in skipped] == [f"skipped {images / 'broken.png'}",
                                                        f"skipped {images / 'notes.txt'}"]
    assert "4 images" in captured.out and "2 of 6 inputs skipped" in captured.out
    assert sorted(os.listdir(tmp_path / "out")) == ["img0.png", "img1.png", "img2.png", "img3.png",
                                                    "predictions.json"]
    assert main(["--config-file", config_file, "--checkpoint", checkpoint, "--input", str(images / "notes.txt"),
                 "--output", str(tmp_path / "out2")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "notes.txt" in error[0] and error[0].startswith("lgd-predict: error: ")


def test_an_earlier_output_is_kept_without_overwrite(demo_model, tmp_path, capsys):
    from lgd.tools.predict import main

    root, config_file, checkpoint, _, _, images = demo_model
    out = tmp_path / "out"
    argv = ["--config-file", config_file, "--checkpoint", checkpoint, "--input", os.path.join(images, "img2.png"),
            "--output", str(out)]
    assert main(argv) == 0
    stamp = os.path.getmtime(out / "img2.png")
    capsys.readouterr()
    assert main(argv) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert os.path.getmtime(out / "img2.png") == stamp
    assert main(argv + ["--overwrite"]) == 0


def test_a_checkpoint_that_does_not_fit_is_refused_before_any_image_is_read(demo_model, tmp_path, capsys,
                                                                           monkeypatch):
    from lgd.runner import predict as predict_module
    from lgd.tools.predict import main

    root, config_file, checkpoint, _, _, images = demo_model
    read = []
    monkeypatch.setattr(predict_module, "read_image", lambda *a, **k: read.append(a))
    status = main(["--config-file", config_file, "--checkpoint", checkpoint, "--input", images,
                   "--output", str(tmp_path / "out"), "model.num_classes=3"])
    assert status == 1 and read == []
    error, hint = capsys.readouterr().err.strip().splitlines()
    assert error.startswith(f"lgd-predict: error: checkpoint {checkpoint} does not fit the model")
    assert hint.startswith("lgd-predict: hint: pass the run's own config")
    assert not os.path.exists(tmp_path / "out")


def test_the_exported_student_predicts_as_the_run_checkpoint(demo_model, tmp_path):
    images = demo_model[5]
    predict(demo_model, [os.path.join(images, "img3.png")], tmp_path / "run")
    predict(demo_model, [os.path.join(images, "img3.png")], tmp_path / "student", checkpoint=demo_model[3])
    with open(tmp_path / "run" / "predictions.json") as f, open(tmp_path / "student" / "predictions.json") as g:
        assert json.load(f) == json.load(g)


def test_an_input_matching_nothing_is_a_usage_error(demo_model, tmp_path, capsys):
    from lgd.tools.predict import main

    assert main(["--config-file", demo_model[1], "--checkpoint", demo_model[2], "--input",
                 str(tmp_path / "nothing*.png"), "--output", str(tmp_path / "out")]) == 2
    assert "no file matches it" in capsys.readouterr().err


def test_overrides_after_the_inputs_are_overrides_and_the_console_scripts_are_declared(tmp_path, monkeypatch):
    from lgd.tools.predict import parse_args

    monkeypatch.chdir(tmp_path)
    (tmp_path / "lr=0.1.png").write_bytes(b"")  # an existing file whose name looks like an override stays an input
    args = parse_args(["--config-file", "c.py", "--checkpoint", "k.pth", "--input", "lr=0.1.png", "train.device=cpu",
                       "--output", "out", "model.num_classes=3"])
    assert args.input == ["lr=0.1.png"] and args.opts == ["train.device=cpu", "model.num_classes=3"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "setup.py")) as f:
        text = f.read()
    assert '"lgd-predict=lgd.tools.predict:main"' in text and '"lgd-inspect=lgd.tools.inspect:main"' in text
