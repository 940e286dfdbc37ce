"""lgd-inspect on the demo's small model (test_predict's fixture: random init, 128 px, the synthetic 4-image
dataset), in seconds on CPU: the .npz holds maps of the level's shape, attention rows summing to 1 over the image's
own objects (its context object included), per-cell errors that add up to the step's own loss_distill, and the
page; a student-only checkpoint, an unknown image id, dataset or level, a config of another method and an existing
output each get one line."""
import os

import numpy as np
import pytest

pytest.importorskip("detectron2")
pytest.importorskip("pycocotools")

from test_predict import DATASET, demo_model  # noqa: E402,F401 - the fixture


def inspect(demo_model, tmp_path, *extra, checkpoint=None, name="page.png"):  # noqa: F811
    from lgd.tools.inspect import main

    root, config_file, run_checkpoint, _, ann, images = demo_model
    return main(["--config-file", config_file, "--checkpoint", checkpoint or run_checkpoint,
                 f"--dataset={DATASET}={ann}:{images}", "--output", str(tmp_path / name), *extra])


def test_npz_holds_the_level_maps_attention_rows_and_the_loss(demo_model, tmp_path):  # noqa: F811
    from detectron2.config import instantiate

    from lgd.config import load_config

    assert inspect(demo_model, tmp_path, "--image-id", "2") == 0  # img1.png: 2 objects
    data = np.load(tmp_path / "page.npz")
    assert os.path.getsize(tmp_path / "page.png") > 0
    level = str(data["level"])
    assert level == str(data["levels"][int(np.argmax(data["level_covered_cells"]))])
    stride = instantiate(load_config(demo_model[1]).model.backbone).output_shape()[level].stride
    shape = tuple(-(-int(s) // stride) for s in data["padded_size"])
    assert data["student"].shape == data["instructive"].shape == (64, *shape)
    assert data["error"].shape == data["student_rgb"].shape[:2] == data["instructive_rgb"].shape[:2] == shape
    assert list(data["class_names"]) == ["red", "blue", "context"] or list(data["class_names"]) == [
        "blue", "red", "context"]
    attention = data["attention"]
    assert attention.shape == (3, 3) and (attention >= 0).all()
    np.testing.assert_allclose(attention.sum(1), 1.0, rtol=1e-5)
    # the per-cell errors are normalized_mse's summands: over all levels they give the step's loss_distill
    loss = data["loss_weight"] * data["error_sums"].sum() / data["error_sizes"].sum()
    assert loss == pytest.approx(float(data["loss_distill"]), rel=1e-4)


def test_a_chosen_level_and_an_image_with_one_object(demo_model, tmp_path):  # noqa: F811
    assert inspect(demo_model, tmp_path, "--image-id", "1", "--level", "p5", "--dataset-name", DATASET) == 0
    data = np.load(tmp_path / "page.npz")
    assert str(data["level"]) == "p5" and data["attention"].shape == (2, 2)
    np.testing.assert_allclose(data["attention"].sum(1), 1.0, rtol=1e-5)
    assert data["error"].shape == data["student"].shape[1:]


@pytest.mark.parametrize("extra, message", [
    (["--image-id", "99"], f"image id 99 is not in dataset {DATASET} (4 images, ids 1..4)"),
    (["--image-id", "1", "--dataset-name", "nope"], "dataset 'nope' is not registered"),
    (["--image-id", "1", "--level", "p9"], "--level p9: the distilled levels are p3, p4, p5, p6, p7"),
    (["--image-id", "1", "lgd.method=baseline"],
     "lgd-inspect draws LGD's instructive knowledge; the config's lgd.method is baseline"),
])
def test_bad_image_dataset_or_level_is_one_line(demo_model, tmp_path, capsys, extra, message):  # noqa: F811
    assert inspect(demo_model, tmp_path, *extra) in (1, 2)
    error = capsys.readouterr().err.strip().splitlines()
    assert error[0] == f"lgd-inspect: error: {message}" and len(error) <= 2
    assert not os.path.exists(tmp_path / "page.png")


def test_a_student_only_checkpoint_is_refused_in_one_line(demo_model, tmp_path, capsys):  # noqa: F811
    assert inspect(demo_model, tmp_path, "--image-id", "1", checkpoint=demo_model[3]) == 1
    error, hint = capsys.readouterr().err.strip().splitlines()
    assert error.startswith(f"lgd-inspect: error: checkpoint {demo_model[3]} holds no instructive modules")
    assert "lgd-inspect needs a run's checkpoint with them" in error and "model_final.pth" in hint


def test_an_existing_page_is_kept_without_overwrite(demo_model, tmp_path, capsys):  # noqa: F811
    (tmp_path / "page.npz").write_bytes(b"earlier")
    assert inspect(demo_model, tmp_path, "--image-id", "1") == 2
    assert "page.npz exists: refusing to overwrite it" in capsys.readouterr().err
    assert (tmp_path / "page.npz").read_bytes() == b"earlier" and not (tmp_path / "page.png").exists()
    assert inspect(demo_model, tmp_path, "--image-id", "1", "--overwrite") == 0
    assert np.load(tmp_path / "page.npz")["attention"].shape == (2, 2)


@pytest.mark.parametrize("interaction", ["label_guided", "student_fill"])
def test_the_ablation_interactions(demo_model, tmp_path, interaction):  # noqa: F811
    """label_guided records the attention with the label embeddings as queries; a fill variant has no attention
    and its page says so instead of failing (the checkpoint holds every weight such a teacher has)."""
    assert inspect(demo_model, tmp_path, "--image-id", "2", f"lgd.interaction={interaction}") == 0
    data = np.load(tmp_path / "page.npz")
    assert str(data["interaction"]) == interaction and os.path.getsize(tmp_path / "page.png") > 0
    if interaction == "label_guided":
        assert str(data["attention_query"]) == "label" and data["attention"].shape == (3, 3)
        np.testing.assert_allclose(data["attention"].sum(1), 1.0, rtol=1e-5)
    else:
        assert data["attention"].size == 0 and str(data["attention_query"]) == ""
