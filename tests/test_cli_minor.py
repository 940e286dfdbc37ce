"""The small things a demanding user meets (issue 23, item 8): each is one line naming the key or file, nothing
written before the check, a traceback only with --debug; --resume never writes through a symlinked
config.yaml; train.checkpointer.max_to_keep holds across resumes; normalized_mse names the odd map."""
import os

import pytest
import torch

pytest.importorskip("detectron2")
pytest.importorskip("pycocotools")

from lgd.errors import UsageError  # noqa: E402
from lgd.tools import export, train_net  # noqa: E402
from test_cli_reliability import command  # noqa: E402
from test_lgd_train_net import argv, make_setup  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("lgd_minor"))


def test_a_value_that_is_not_a_number_names_its_key_before_writing(setup, tmp_path):
    _, cfg_file, ann, images = setup
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=r"^optimizer.lr='abc' must be a number$"):
        train_net.run(argv(cfg_file, ann, images, str(out), "optimizer.lr=abc"))
    assert not out.exists()


def test_a_non_ascii_unquoted_override_gets_a_hint_to_quote_it(setup):
    from lgd.config import load_config

    with pytest.raises(UsageError) as info:
        load_config(setup[1], ["train.output_dir=/tmp/résumé"])
    assert "train.output_dir=/tmp/résumé" in str(info.value) and "quote" in info.value.hint
    assert load_config(setup[1], ["train.output_dir='/tmp/résumé'"]).train.output_dir == "/tmp/résumé"


def test_export_output_in_a_missing_folder_or_a_dangling_symlink(setup, tmp_path):
    cfg_file = setup[1]
    checkpoint = tmp_path / "in.pth"
    checkpoint.write_bytes(b"not read: the output is checked first")
    missing = tmp_path / "missing" / "dir" / "x.pth"
    with pytest.raises(UsageError, match=f"folder {tmp_path / 'missing' / 'dir'} does not exist"):
        export.run(["--config-file", cfg_file, "--checkpoint", str(checkpoint), "--output", str(missing)])
    link = tmp_path / "link.pth"
    link.symlink_to(tmp_path / "nowhere.pth")
    with pytest.raises(UsageError, match="exists: refusing to overwrite it"):
        export.run(["--config-file", cfg_file, "--checkpoint", str(checkpoint), "--output", str(link)])
    assert os.path.islink(link) and not (tmp_path / "nowhere.pth").exists()


def test_normalized_mse_names_the_map_of_another_dtype():
    import lgd_ops

    maps = [torch.randn(1, 2, 4, 4, dtype=torch.float64), torch.randn(1, 2, 2, 2)]
    with pytest.raises(ValueError, match=r"student\[1\] is torch.float32, student\[0\] is torch.float64"):
        lgd_ops.normalized_mse(maps, [m.clone() for m in maps], backend="reference")
    teachers = [maps[0].clone(), maps[1].double()]
    with pytest.raises(ValueError, match=r"teacher\[1\] is torch.float64, student\[0\] is torch.float64"
                                         r"|student\[1\] is torch.float32"):
        lgd_ops.normalized_mse([maps[0], maps[1]], teachers, backend="reference")


def test_resume_keeps_max_to_keep_and_never_writes_through_a_symlinked_config(setup, tmp_path):
    _, cfg_file, ann, images = setup
    out = tmp_path / "run"
    keep = ["train.checkpointer.period=1", "train.checkpointer.max_to_keep=2", "dataloader.evaluator=null"]
    train_net.run(argv(cfg_file, ann, images, str(out), max_iter=3) + keep)
    target = tmp_path / "elsewhere.yaml"
    target.write_text("not the run's")
    (out / "config.yaml").unlink()
    (out / "config.yaml").symlink_to(target)
    train_net.run(argv(cfg_file, ann, images, str(out), "--resume", max_iter=5) + keep)
    assert target.read_text() == "not the run's" and not os.path.islink(out / "config.yaml")
    assert sorted(p.name for p in out.glob("model_0*.pth")) == ["model_0000003.pth", "model_0000004.pth"]


def test_training_failure_has_no_traceback_without_debug(setup, tmp_path):
    """A failure inside training (here a non-finite learning rate's NaN loss) prints no traceback on stdout or
    stderr; --debug shows it."""
    _, cfg_file, ann, images = setup
    for debug in (False, True):
        out = tmp_path / f"debug_{debug}"
        proc = command("lgd-train", *argv(cfg_file, ann, images, str(out), "optimizer.lr=1e30", max_iter=3),
                       *(["--debug"] if debug else []))
        assert proc.returncode == 1
        assert ("Traceback" in proc.stdout + proc.stderr) == debug, (proc.stdout + proc.stderr)[-3000:]
        assert "Traceback" in (out / "log.txt").read_text()  # the log file keeps it
