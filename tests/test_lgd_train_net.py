"""lgd-train end to end (lgd.tools.train_net.run), CPU, tiny: a synthetic 4-image COCO dataset on disk, the shipped
LGD RetinaNet config shrunk (test_lgd_distiller's ResNet-18/BN/32-channel model, 96 x 128 images, batch 2) by a
config file that loads it, 4 iterations, checkpoints every 2, COCO evaluation of the student at the end, then
--resume from the iteration-2 checkpoint and --eval-only; the baseline (lgd.method=baseline), lgd-eval on LGD
and plain checkpoints, and lgd-export's round trip into a stock detectron2 model in a process without lgd."""
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("detectron2")

import torch

pytest.importorskip("pycocotools")

from lgd.config import load_config  # noqa: E402
from lgd.methods import build_method  # noqa: E402
from lgd.runner import apply_dataset_arguments, build_schedule, set_num_classes  # noqa: E402
from lgd.tools.eval_net import run as eval_run  # noqa: E402
from lgd.tools.train_net import build_parser, run  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LGD_CONFIG = os.path.join(ROOT, "lgd", "configs", "retinanet_R_50_FPN_1x_lgd.py")
H, W = 96, 128
DATASET = "lgd_test_synth"

TINY_CONFIG = """
from detectron2.config import LazyCall as L, LazyConfig
import detectron2.data.transforms as T
from conftest import shrink_retinanet_config

_cfg = LazyConfig.load({config!r})
dataloader, model, optimizer, train, lgd = _cfg.dataloader, _cfg.model, _cfg.optimizer, _cfg.train, _cfg.lgd
shrink_retinanet_config(model, num_classes=2)
dataloader.train.mapper.augmentations = [L(T.RandomFlip)(horizontal=True)]
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = 0
dataloader.test.mapper.augmentations = []
dataloader.test.num_workers = 0
train.init_checkpoint = ""
"""


def make_dataset(root):
    """4 PNG images with 1-2 filled rectangles each, 2 categories, a COCO json. Runs register it as DATASET:
    a registration of an earlier dataset under that name (another test module's files) is removed first."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from PIL import Image, ImageDraw

    if DATASET in DatasetCatalog.list():
        DatasetCatalog.remove(DATASET)
        MetadataCatalog.remove(DATASET)

    images_dir = root / "images"
    images_dir.mkdir()
    rects = [[(10, 10, 50, 40, 1)], [(60, 20, 120, 80, 2), (5, 50, 40, 90, 1)],
             [(30, 30, 90, 70, 2)], [(0, 0, 64, 48, 1), (70, 50, 125, 92, 2)]]
    images, annotations = [], []
    for i, objs in enumerate(rects):
        img = Image.new("RGB", (W, H), (40, 40, 40))
        draw = ImageDraw.Draw(img)
        for x0, y0, x1, y1, cat in objs:
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=(220, 30, 30) if cat == 1 else (30, 30, 220))
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cat,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
                                "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
        name = f"img{i}.png"
        img.save(images_dir / name)
        images.append({"id": i + 1, "file_name": name, "width": W, "height": H})
    ann = root / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations,
                               "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}]}))
    return str(ann), str(images_dir)



def overrides(out, max_iter=4):
    """The LazyConfig overrides of every run here: the synthetic dataset, CPU, checkpoints every 2 iterations."""
    return [f"train.output_dir={out}", f"train.max_iter={max_iter}", "train.checkpointer.period=2",
            "train.eval_period=0", "train.log_period=1", "train.device=cpu",
            f"dataloader.train.dataset.names={DATASET}", f"dataloader.test.dataset.names={DATASET}"]


def argv(cfg_file, ann, images, out, *extra, max_iter=4):
    spec = f"{DATASET}={ann}:{images}"
    return ["--config-file", cfg_file, "--ops", "reference", "--train-dataset", spec, "--test-dataset", spec,
            *extra, *overrides(out, max_iter)]


def read_metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def make_setup(root):
    """(root, tiny LGD config file, dataset json, image folder) of the runs here, written under root."""
    ann, images = make_dataset(root)
    cfg_file = root / "tiny_lgd.py"
    cfg_file.write_text(TINY_CONFIG.format(config=LGD_CONFIG))
    return root, str(cfg_file), ann, images


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("lgd_train_net"))


@pytest.fixture(scope="module")
def trained(setup):
    root, cfg_file, ann, images = setup
    out = str(root / "run")
    results = run(argv(cfg_file, ann, images, out))
    return out, results


def test_train_logs_finite_lgd_losses(trained):
    out, _ = trained
    rows = [r for r in read_metrics(out) if "loss_distill" in r]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    for row in rows:
        for key in ("loss_cls", "loss_box_reg", "loss_cls_tea", "loss_box_reg_tea", "loss_distill", "total_loss"):
            assert math.isfinite(row[key]), (key, row)
        assert "lr" in row and "lr_teacher" in row


def test_checkpoints_written(trained):
    out, _ = trained
    for name in ("model_0000001.pth", "model_0000003.pth", "model_final.pth", "last_checkpoint"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]  # atomic writes leave no temporaries
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read().strip() == "model_final.pth"


def test_coco_evaluation_of_student(trained):
    out, results = trained
    assert set(results) == {"bbox"}
    assert {"AP", "AP50", "AP75"} <= set(results["bbox"])
    assert any("bbox/AP" in r for r in read_metrics(out))


def test_resume_from_iteration_2_checkpoint(setup, trained):
    root, cfg_file, ann, images = setup
    out = root / "resumed"
    out.mkdir()
    shutil.copy(os.path.join(trained[0], "model_0000001.pth"), out / "model_0000001.pth")
    (out / "last_checkpoint").write_text("model_0000001.pth")
    results = run(argv(cfg_file, ann, images, str(out), "--resume"))
    iterations = [r["iteration"] for r in read_metrics(str(out)) if "loss_distill" in r]
    assert iterations == [2, 3]
    assert (out / "model_final.pth").is_file() and "bbox" in results


def test_eval_only_evaluates_checkpoint(setup, trained):
    _, cfg_file, ann, images = setup
    out = trained[0]
    results = run(argv(cfg_file, ann, images, out, "--eval-only",
                        f"train.init_checkpoint={os.path.join(out, 'model_final.pth')}"))
    assert "AP" in results["bbox"]


def test_schedule_rule():
    from detectron2.config import LazyConfig

    cfg = LazyConfig.load(LGD_CONFIG)
    full = build_schedule(cfg)
    assert (full.max_iter, full.steps, full.distill_start_iter, full.backbone_freeze_iters) == (
        90000, (60000, 80000), 30000, 10000)
    cfg.train.max_iter = 900
    short = build_schedule(cfg)
    assert (short.steps, short.distill_start_iter, short.backbone_freeze_iters, short.warmup_iters) == (
        (600, 800), 300, 100, 10)
    cfg2 = LazyConfig.load(LGD_CONFIG.replace("1x", "2x"))
    two = build_schedule(cfg2)
    assert (two.max_iter, two.steps, two.distill_start_iter, two.backbone_freeze_iters) == (
        180000, (120000, 160000), 30000, 20000)


def test_atomic_checkpointer_loads_plain_student_checkpoint(tmp_path):
    import torch

    from lgd.engine.checkpoint import AtomicCheckpointer
    from test_lgd_distiller import make_distiller

    src, dst = make_distiller(seed=0), make_distiller(seed=1)
    torch.save({"model": src.detector.state_dict()}, tmp_path / "student.pth")  # stock detectron2 keys
    AtomicCheckpointer(dst, str(tmp_path)).load(str(tmp_path / "student.pth"))
    for name, value in src.detector.state_dict().items():
        assert torch.equal(dst.detector.state_dict()[name], value), name
    AtomicCheckpointer(dst, str(tmp_path)).save("full")
    assert sorted(os.listdir(tmp_path)) == ["full.pth", "last_checkpoint", "student.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "full.pth"
    assert any(k.startswith("teacher.") for k in torch.load(tmp_path / "full.pth")["model"])


def test_tensorboard_events_written(trained):
    out, _ = trained
    assert [f for f in os.listdir(out) if f.startswith("events.out.tfevents")]


def test_baseline_mode_trains_plain_detector(setup):
    root, cfg_file, ann, images = setup
    out = str(root / "baseline")
    results = run(argv(cfg_file, ann, images, out, "lgd.method=baseline", max_iter=2))
    rows = [r for r in read_metrics(out) if "loss_cls" in r]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert all(math.isfinite(r["loss_cls"]) and "loss_distill" not in r and "lr_teacher" not in r for r in rows)
    state = torch.load(os.path.join(out, "model_final.pth"))
    assert state["model"] and not any(k.startswith(("detector.", "teacher.")) for k in state["model"])
    assert "optimizers" not in state["trainer"] and state["trainer"]["optimizer"]["param_groups"]
    assert "AP" in results["bbox"]


@pytest.fixture(scope="module")
def exported(setup, trained):
    """lgd-export of the trained LGD checkpoint (python -m lgd.tools.export's main)."""
    from lgd.tools.export import run as export_main

    root, cfg_file, _, _ = setup
    path = str(root / "student.pth")
    export_main(["--config-file", cfg_file, "--checkpoint", os.path.join(trained[0], "model_final.pth"),
                 "--output", path])
    return path


def test_eval_main_on_lgd_and_exported_checkpoints(setup, trained, exported):
    _, cfg_file, ann, images = setup
    common = ["--config-file", cfg_file, "--test-dataset", f"{DATASET}={ann}:{images}"]
    cfg_overrides = overrides(trained[0])
    lgd_results = eval_run(common + ["--checkpoint", os.path.join(trained[0], "model_final.pth")] + cfg_overrides)
    plain_results = eval_run(common + ["--checkpoint", exported] + cfg_overrides)
    assert "AP" in lgd_results["bbox"]
    assert lgd_results == plain_results or all(  # NaN APs (no detections) compare unequal
        math.isnan(a) and math.isnan(b) or a == b
        for a, b in zip(lgd_results["bbox"].values(), plain_results["bbox"].values()))


def test_eval_with_the_runs_own_config_yaml(setup, trained):
    """The run's OUTPUT/config.yaml (overrides included) evaluates its checkpoint without repeating them."""
    _, _, ann, images = setup
    own = ["--config-file", os.path.join(trained[0], "config.yaml"), "--test-dataset", f"{DATASET}={ann}:{images}"]
    results = eval_run(own + ["--checkpoint", os.path.join(trained[0], "model_final.pth")])
    assert "AP" in results["bbox"]


def test_export_checks_the_config(setup, trained, tmp_path):
    from lgd.tools.export import run as export_main

    _, cfg_file, _, _ = setup
    with pytest.raises(ValueError, match="does not fit") as refused:
        export_main(["--config-file", cfg_file, "--checkpoint", os.path.join(trained[0], "model_final.pth"),
                     "--output", str(tmp_path / "x.pth"), "model.num_classes=3"])
    assert "--config-file OUTPUT/config.yaml" in refused.value.hint  # the run's own config holds its overrides
    assert not os.listdir(tmp_path)


STOCK_SCRIPT = """
import sys
for name in ("lgd", "lgd_ops"):  # any import of the project fails in this process
    sys.modules[name] = None
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate

model_file, checkpoint, inputs_file, outputs_file, threads = sys.argv[1:]
torch.set_num_threads(int(threads))  # the parent's: the same reduction order in every kernel
model = instantiate(LazyConfig.load(model_file).model).eval()
DetectionCheckpointer(model).load(checkpoint)
with torch.no_grad():
    outputs = model(torch.load(inputs_file))
torch.save([{k: getattr(v, "tensor", v) for k, v in o["instances"].get_fields().items()} for o in outputs],
           outputs_file)
"""


def test_export_round_trip_in_stock_detectron2(setup, trained, exported, tmp_path):
    """The exported student, loaded by detectron2 alone in a fresh process (lgd imports blocked), gives the
    same detections, bit for bit, as the student inside the LGD checkpoint (score threshold 0: many boxes)."""
    from detectron2.config import LazyConfig
    from omegaconf import OmegaConf

    from lgd.engine.checkpoint import AtomicCheckpointer
    from lgd.runner import build_model

    _, cfg_file, _, _ = setup
    cfg = load_config(cfg_file, ["model.test_score_thresh=0.0", "train.device=cpu"])
    LazyConfig.save(OmegaConf.create({"model": cfg.model}, flags={"allow_objects": True}), str(tmp_path / "m.yaml"))
    generator = torch.Generator().manual_seed(0)
    inputs = [{"image": torch.randint(0, 256, (3, H, W), generator=generator, dtype=torch.uint8).float(),
               "height": H, "width": W} for _ in range(2)]
    torch.save(inputs, tmp_path / "inputs.pt")
    subprocess.run([sys.executable, "-c", textwrap.dedent(STOCK_SCRIPT), str(tmp_path / "m.yaml"), exported,
                    str(tmp_path / "inputs.pt"), str(tmp_path / "outputs.pt"), str(torch.get_num_threads())],
                   check=True, cwd=str(tmp_path))
    stock = torch.load(tmp_path / "outputs.pt")

    model = build_model(cfg, build_method(cfg, "lgd", backend="reference"))
    AtomicCheckpointer(model).load(os.path.join(trained[0], "model_final.pth"))
    with torch.no_grad():
        ours = [o["instances"].get_fields() for o in model.eval()(inputs)]
    assert len(ours[0]["scores"]) > 0
    for got, want in zip(stock, ours):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert torch.equal(got[key], getattr(value, "tensor", value)), key


def test_checkpointer_loads_lgd_checkpoint_into_plain_detector(tmp_path):
    from lgd.engine.checkpoint import AtomicCheckpointer, student_state_dict
    from lgd.runner import evaluate
    from test_lgd_distiller import make_distiller, tiny_retinanet

    src = make_distiller(seed=0)
    AtomicCheckpointer(src, str(tmp_path)).save("lgd")
    detector = tiny_retinanet(seed=1)
    AtomicCheckpointer(detector).load(str(tmp_path / "lgd.pth"))
    want = student_state_dict(src.state_dict())
    assert want.keys() == detector.state_dict().keys()
    for name, value in detector.state_dict().items():
        assert torch.equal(want[name], value), name
    with pytest.raises(ValueError, match="checkpoint"):
        evaluate(None, "")


@pytest.mark.parametrize("config", ["retinanet_R_50_FPN_1x_lgd.py", "fcos_R_50_FPN_1x_lgd.py",
                                    "mask_rcnn_R_50_FPN_1x_lgd.py"])
def test_train_dataset_sets_names_and_num_classes(setup, config):
    """--train-dataset / --test-dataset point the loaders at the dataset and size the classifier from its json."""
    _, _, ann, images = setup
    cfg = load_config(os.path.join(ROOT, "lgd", "configs", config))
    args = build_parser().parse_args(["--train-dataset", f"{DATASET}={ann}:{images}",
                                      "--test-dataset", f"{ann}:{images}"])
    apply_dataset_arguments(cfg, args)
    assert cfg.dataloader.train.dataset.names == DATASET
    assert cfg.dataloader.test.dataset.names == "ann"  # the json's stem
    heads = [n for n in (cfg.model, cfg.model.get("head"), cfg.model.get("roi_heads")) if n and "num_classes" in n]
    assert heads and all(n.num_classes == 2 for n in heads)


def test_set_num_classes_needs_a_key():
    from omegaconf import OmegaConf

    with pytest.raises(ValueError, match="num_classes"):
        set_num_classes(OmegaConf.create({"model": {"backbone": {}}}), 3)


@pytest.mark.parametrize("detector", ["fcos", "faster_rcnn", "mask_rcnn"])
def test_lgd_train_runs_each_detector_config(tmp_path, detector):
    """lgd-train end to end with each detector's LGD config (shrunk): 2 iterations, then COCO evaluation."""
    ann, images = make_dataset(tmp_path)
    config = os.path.join(ROOT, "lgd", "configs", f"{detector}_R_50_FPN_1x_lgd.py")
    cfg_file = tmp_path / "tiny.py"
    # 128x160 inputs: FCOS's GroupNorm head needs more than one cell on P7 in training
    cfg_file.write_text(TINY_CONFIG.format(config=config) + textwrap.dedent("""
        dataloader.train.mapper.augmentations = [L(T.Resize)(shape=(128, 160))]
        dataloader.test.mapper.augmentations = [L(T.Resize)(shape=(128, 160))]
        """))
    out = str(tmp_path / "run")
    results = run(argv(str(cfg_file), ann, images, out, max_iter=2))
    assert "AP" in results["bbox"]
    rows = [r for r in read_metrics(out) if "loss_distill" in r]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert all(math.isfinite(v) for r in rows for k, v in r.items() if k.startswith("loss_"))
    assert any(k.endswith("_tea") for k in rows[-1])
    assert ("loss_mask_tea" in rows[-1]) == (detector == "mask_rcnn")


def test_auto_choices_recorded_and_kept_on_resume(tmp_path):
    """--ops auto: the backends auto measured are in the checkpoint and cost.json; a resumed run takes the
    checkpoint's choices instead of measuring again (here forced to the reference), so it runs the same kernels."""
    import lgd_ops
    from lgd.runner import read_cost

    _, cfg_file, ann, images = make_setup(tmp_path)  # its own dataset: an earlier test may have registered another
    out = str(tmp_path / "auto")
    lgd_ops.set_auto_choices({})
    run(argv(cfg_file, ann, images, out, "--ops", "auto", max_iter=2))
    with open(os.path.join(out, "last_checkpoint")) as f:
        last = os.path.join(out, f.read().strip())
    state = torch.load(last, weights_only=True)
    choices = state["lgd_ops_auto"]["choices"]
    assert {key.split("/")[0] for key in choices} == {"box_pool", "box_fill", "normalized_mse"}
    assert read_cost(out)["lgd_ops_auto"] == choices
    forced = {key: "reference" for key in choices}
    state["lgd_ops_auto"]["choices"] = forced
    torch.save(state, last)
    lgd_ops.set_auto_choices({})
    run(argv(cfg_file, ann, images, out, "--ops", "auto", "--resume", max_iter=3))
    assert lgd_ops.auto_choices() == forced and read_cost(out)["lgd_ops_auto"] == forced
