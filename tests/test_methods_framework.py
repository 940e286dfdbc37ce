"""lgd-train's training-method framework (lgd.methods, docs/methods/README.md), CPU, tiny: a toy method defined here
(registered in lgd.methods.METHOD_REGISTRY for this module) with one stage (a baseline run of the same detector) whose
final checkpoint becomes a frozen part of the wrapper model. The stage trains first into OUTPUT/teacher and is
reused or continued later, OUTPUT/cost.json adds the stage's cost to the run's, --overwrite removes the stage,
a bad method, setting or stage config is a usage error before anything is written, and lgd-eval / lgd-export /
AtomicCheckpointer read the student of the wrapper's checkpoint. test_lgd_train_net's dataset and tiny config."""
import copy
import json
import math
import os
import pickle
import shutil
import statistics

import pytest

pytest.importorskip("detectron2")
pytest.importorskip("pycocotools")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from detectron2.config import instantiate  # noqa: E402

from lgd.engine.checkpoint import AtomicCheckpointer, student_state_dict  # noqa: E402
from lgd.methods import METHOD_REGISTRY, Stage, TrainingMethod  # noqa: E402
from lgd.config import load_config  # noqa: E402
from lgd.methods import build_method  # noqa: E402
from lgd.runner import build_model  # noqa: E402
from lgd.tools.eval_net import run as eval_run  # noqa: E402
from lgd.tools.train_net import main, run  # noqa: E402
from test_lgd_train_net import DATASET, argv, make_setup, overrides, read_metrics  # noqa: E402


class ToyWrapper(nn.Module):
    """The student plus a frozen detector (the stage's) that pulls the student's weights towards its own."""

    def __init__(self, detector, teacher, weight):
        super().__init__()
        self.detector, self.teacher, self.weight = detector, teacher, float(weight)
        self.teacher.requires_grad_(False)
        self.teacher.eval()

    def train(self, mode=True):
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, batched_inputs):
        if not self.training:
            return self.detector(batched_inputs)
        losses = self.detector(batched_inputs)
        pairs = zip(self.detector.parameters(), self.teacher.parameters())
        losses["loss_toy"] = self.weight * sum(((s - t) ** 2).sum() for s, t in pairs)
        return losses


class ToyMethod(TrainingMethod):
    """One stage ("teacher": a run of lgd.toy.stage_method on the same config), then ToyWrapper around it."""

    name = "toy"
    DEFAULTS = {"weight": 1e-3, "stage_method": "baseline"}

    def stages(self):
        cfg = copy.deepcopy(self.cfg)
        cfg.lgd.method = self.settings["stage_method"]
        return [Stage("teacher", cfg)]

    def build(self, detector, checkpoints):
        teacher = instantiate(self.cfg.model)
        AtomicCheckpointer(teacher).load_checked(checkpoints["teacher"])
        return ToyWrapper(detector, teacher, self.settings["weight"])


@pytest.fixture(scope="module", autouse=True)
def toy_registered():
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(METHOD_REGISTRY._obj_map, "toy", ToyMethod)
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("methods_framework"))


def toy_argv(setup, out, *extra, max_iter=4):
    _, cfg_file, ann, images = setup
    return argv(cfg_file, ann, images, str(out), *extra, "lgd.method=toy", max_iter=max_iter)


def mtimes(folder):
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in sorted(os.listdir(folder))}


def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def toy_run(setup):
    out = setup[0] / "toy"
    results = run(toy_argv(setup, out))
    return str(out), results


def test_stage_trains_first_into_its_folder(toy_run):
    out, results = toy_run
    stage = os.path.join(out, "teacher")
    assert {"model_final.pth", "metrics.json", "config.yaml", "cost.json"} <= set(os.listdir(stage))
    stage_rows = [r for r in read_metrics(stage) if "loss_cls" in r]
    assert [r["iteration"] for r in stage_rows] == [0, 1, 2, 3]
    assert not any("loss_toy" in r for r in stage_rows)  # the stage is a baseline run
    rows = [r for r in read_metrics(out) if "loss_toy" in r]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert all(math.isfinite(r["loss_toy"]) for r in rows) and rows[0]["loss_toy"] > 0  # towards the trained stage
    assert os.stat(os.path.join(stage, "model_final.pth")).st_mtime_ns < os.stat(
        os.path.join(out, "model_0000001.pth")).st_mtime_ns
    assert "AP" in results["bbox"]


def test_wrapper_checkpoint_keeps_the_frozen_part(toy_run):
    out, _ = toy_run
    state = torch.load(os.path.join(out, "model_final.pth"))["model"]
    teacher = torch.load(os.path.join(out, "teacher", "model_final.pth"))["model"]
    frozen = {k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")}
    assert frozen.keys() == teacher.keys()
    assert all(torch.equal(frozen[k], teacher[k]) for k in teacher)
    student = student_state_dict(state)
    assert student.keys() == teacher.keys()
    assert any(not torch.equal(student[k], teacher[k]) for k in teacher)  # the student trained on


def test_cost_json_adds_the_stage(toy_run):
    out, _ = toy_run
    cost = read_json(os.path.join(out, "cost.json"))
    stage = cost["stages"]["teacher"]
    assert stage == read_json(os.path.join(out, "teacher", "cost.json"))
    assert (cost["method"], cost["iterations"], cost["max_iter"]) == ("toy", 4, 4)
    assert (stage["method"], stage["iterations"], stage["stages"]) == ("baseline", 4, {})
    assert cost["wall_s"] > 0 and stage["wall_s"] > 0 and stage["total_wall_s"] == stage["wall_s"]
    assert cost["total_wall_s"] == pytest.approx(cost["wall_s"] + stage["wall_s"])
    times = [r["time"] for r in read_metrics(out) if "time" in r]
    assert times and cost["s_per_iter"] == pytest.approx(statistics.median(times))
    assert cost["peak_mem_kind"] == "cpu_peak_rss" and cost["peak_mem_mb"] > 0


def test_second_run_reuses_the_stage(setup, toy_run):
    out, _ = toy_run
    stage = os.path.join(out, "teacher")
    before = mtimes(stage)
    run(toy_argv(setup, out, "--resume"))
    assert mtimes(stage) == before  # not retrained, not even rewritten
    assert read_json(os.path.join(out, "cost.json"))["stages"]["teacher"] == read_json(os.path.join(stage, "cost.json"))


def test_partial_stage_is_continued(setup, toy_run):
    out = setup[0] / "partial"
    stage = out / "teacher"
    shutil.copytree(os.path.join(toy_run[0], "teacher"), stage)
    (stage / "model_final.pth").unlink()
    (stage / "last_checkpoint").write_text("model_0000001.pth")
    spent = read_json(stage / "cost.json")["wall_s"]
    run(toy_argv(setup, out, "--resume"))
    assert [r["iteration"] for r in read_metrics(str(stage)) if "loss_cls" in r] == [0, 1, 2, 3, 2, 3]
    assert (stage / "model_final.pth").is_file()
    cost = read_json(out / "cost.json")
    assert cost["stages"]["teacher"]["wall_s"] > spent  # the resumed piece adds to the earlier one
    assert [r["iteration"] for r in read_metrics(str(out)) if "loss_toy" in r] == [0, 1, 2, 3]


def test_lgd_eval_and_export_read_the_wrapper_student(setup, toy_run, tmp_path):
    from lgd.tools.export import run as export_run

    _, cfg_file, ann, images = setup
    out, _ = toy_run
    checkpoint = os.path.join(out, "model_final.pth")
    results = eval_run(["--config-file", cfg_file, "--test-dataset", f"{DATASET}={ann}:{images}",
                        "--checkpoint", checkpoint] + overrides(out))
    assert "AP" in results["bbox"]
    want = student_state_dict(torch.load(checkpoint)["model"])
    exported = export_run(["--config-file", cfg_file, "--checkpoint", checkpoint, "--output", str(tmp_path / "s.pth")])
    assert exported.keys() == want.keys() and all(torch.equal(exported[k], want[k]) for k in want)
    cfg = load_config(cfg_file, overrides(out) + ["lgd.method=toy"])
    detector = build_model(cfg, build_method(cfg, "baseline"))
    AtomicCheckpointer(detector).load_checked(checkpoint)
    assert all(torch.equal(detector.state_dict()[k], v) for k, v in want.items())
    wrapper = build_model(cfg)  # the stage's checkpoint under OUTPUT/teacher
    assert isinstance(wrapper, ToyWrapper)
    AtomicCheckpointer(wrapper).load_checked(checkpoint)  # a wrapper's checkpoint into a wrapper: keys kept
    saved = torch.load(checkpoint)["model"]
    assert all(torch.equal(wrapper.state_dict()[k], saved[k]) for k in saved)


def test_name_matched_weights_load_into_the_student_only(setup, toy_run, tmp_path):
    """Weights detectron2 matches by name (an ImageNet .pkl: backbone keys without the model's prefixes) go into
    the student only; matched against the whole wrapper, each key would match the frozen copy too (an error)."""
    out, _ = toy_run
    cfg = load_config(setup[1], overrides(out) + ["lgd.method=toy"])
    wrapper = build_model(cfg)
    frozen = {k: v.clone() for k, v in wrapper.teacher.state_dict().items()}
    torch.manual_seed(7)
    source = instantiate(cfg.model).backbone.bottom_up.state_dict()
    with open(tmp_path / "imagenet.pkl", "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in source.items()}, "__author__": "test",
                     "matching_heuristics": True}, f)
    AtomicCheckpointer(wrapper).load(str(tmp_path / "imagenet.pkl"))
    assert all(torch.equal(wrapper.detector.backbone.bottom_up.state_dict()[k], v) for k, v in source.items())
    assert all(torch.equal(wrapper.teacher.state_dict()[k], v) for k, v in frozen.items())
    assert any(not torch.equal(frozen["backbone.bottom_up." + k], v) for k, v in source.items())  # can fail


@pytest.mark.parametrize("extra, message", [
    (["lgd.method=nope"], "lgd.method must be one of ['ban', 'baseline', "),
    (["lgd.method=toy", "+lgd.toy.bogus=1"], "lgd.toy: unknown settings ['bogus']; known: ['stage_method', 'weight']"),
    (["lgd.method=toy", "+lgd.toy.stage_method=nope"], "stage teacher of lgd.method=toy: lgd.method must be one of"),
    (["lgd.enabled=False"], "lgd.enabled is gone: the baseline is lgd.method=baseline"),
    (["lgd.clip_type=norm"], "lgd.clip_type moved to train.clip_gradients.clip_type"),
    (["lgd.distill_weight=2", "+lgd.distil_weight=2"], "lgd: unknown settings ['distil_weight']; known: ["),
])
def test_bad_method_is_a_usage_error_before_writing(setup, capsys, extra, message):
    root, cfg_file, ann, images = setup
    out = root / "refused"
    assert main(argv(cfg_file, ann, images, str(out), *extra)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert errors[0].startswith("lgd-train: error: ") and message in errors[0]
    assert len(errors) == 1 or errors[1].startswith("lgd-train: hint: ") and len(errors) == 2
    assert not out.exists()


def test_overwrite_removes_the_stage(setup, toy_run):
    out, _ = toy_run
    assert main(toy_argv(setup, out)) == 2  # not empty: refused without --resume / --overwrite
    run(toy_argv(setup, out, "--overwrite", "dataloader.evaluator=null", max_iter=2))
    assert [r["iteration"] for r in read_metrics(os.path.join(out, "teacher")) if "loss_cls" in r] == [0, 1]
    assert read_json(os.path.join(out, "cost.json"))["stages"]["teacher"]["iterations"] == 2


def test_every_config_holds_each_methods_settings_as_checked_keys():
    """lgd.<method>.<key> overrides (LGD's: lgd.<key>) are checked against the methods' DEFAULTS in every LGD
    config, whose lgd node is the shared keys and the methods' settings, nothing else."""
    from lgd.methods import SHARED_KEYS, method_names
    from lgd.methods.builtin import LGD
    from lgd.errors import UsageError

    cfg = load_config("lgd/configs/retinanet_R_50_FPN_1x_lgd.py", ["lgd.fgfi.psi=0.6", "lgd.ban.generations=3"])
    assert cfg.lgd.fgfi.psi == 0.6 and cfg.lgd.ban.generations == 3 and cfg.lgd.recompute_teacher is False
    nodes = set()
    for name, method in METHOD_REGISTRY:
        if method.settings_key() == "lgd":
            assert {k: cfg.lgd[k] for k in method.DEFAULTS}.keys() == method.DEFAULTS.keys()
        elif method.DEFAULTS:
            assert method.settings_key() == f"lgd.{name}"
            assert dict(cfg.lgd[name]).keys() == method.DEFAULTS.keys()
            nodes.add(name)
    assert set(cfg.lgd) == set(SHARED_KEYS) | set(LGD.DEFAULTS) | nodes
    assert not set(LGD.DEFAULTS) & (set(SHARED_KEYS) | set(method_names()))
    with pytest.raises(UsageError, match="psy"):
        load_config("lgd/configs/retinanet_R_50_FPN_1x_lgd.py", ["lgd.fgfi.psy=0.6"])


def test_methods_are_registered_under_their_lgd_method_names():
    """METHOD_REGISTRY is a detectron2 Registry keyed by lgd.method; method_names lists it (the toy included here)."""
    import lgd.methods
    from detectron2.utils.registry import Registry
    from lgd.methods import method_class, method_names

    assert isinstance(METHOD_REGISTRY, Registry) and not hasattr(lgd.methods, "METHODS")
    assert method_names() == ["ban", "baseline", "dml", "fgfi", "labelenc", "lgd", "tfkd", "toy"]
    assert all(cls.name == name and issubclass(cls, TrainingMethod) for name, cls in METHOD_REGISTRY)
    assert method_class("toy") is ToyMethod and method_class("lgd").__name__ == "LGD"
    with pytest.raises(ValueError, match=r"lgd.method must be one of \['ban', 'baseline', .*'toy'\], got 'LGD'"):
        method_class("LGD")


def test_lgd_settings_are_the_top_level_lgd_keys():
    """LGD reads its DEFAULTS from the top-level lgd.* keys; the shared keys and the other methods' nodes are not
    its settings, an unknown top-level key is."""
    cfg = load_config("lgd/configs/fcos_R_50_FPN_1x_lgd.py", ["lgd.distill_weight=2.5", "lgd.stn_pool=image"])
    method = build_method(cfg)
    assert method.name == "lgd" and method.settings_key() == "lgd"
    assert method.settings == dict(distill_weight=2.5, teacher_lr=0.01, use_context=False, use_objects=True,
                                   label_encoder="pointnet", interaction="student_guided", instructive_head="shared",
                                   stn_pool="image", rcnn_branch="detector", recompute_teacher=False,
                                   op_report_period=1000)
    assert build_method(cfg, "fgfi").settings_key() == "lgd.fgfi"
    cfg.lgd.distil_weight = 1.0
    with pytest.raises(ValueError, match=r"^lgd: unknown settings \['distil_weight'\]"):
        build_method(cfg)
    assert build_method(cfg, "baseline").name == "baseline"  # LGD's keys are LGD's to check


def test_frozen_parts_get_no_gradient_and_stay_in_eval_mode():
    """A DetectorWrapper's `frozen` list sets requires_grad=False and eval mode where the part is assigned, and
    train() keeps it in eval mode; build_sgd leaves its parameters out."""
    from lgd.engine.optim import build_sgd
    from lgd.modeling.wrapper import DetectorWrapper

    class Frozen(DetectorWrapper):
        frozen = ("teacher",)

        def __init__(self):
            super().__init__()
            self.detector = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
            self.teacher = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))

    model = Frozen().train()
    assert model.detector.training and not model.teacher.training
    assert all(p.requires_grad for p in model.detector.parameters())
    assert not any(p.requires_grad for p in model.teacher.parameters())
    model.teacher = nn.Linear(2, 2)  # a part assigned later is frozen as well
    assert not model.teacher.weight.requires_grad and not model.teacher.training
    teacher = {id(p) for p in model.teacher.parameters()}
    optimizer = build_sgd(model, lr=0.1)
    assert not teacher & {id(p) for g in optimizer.param_groups for p in g["params"]}
