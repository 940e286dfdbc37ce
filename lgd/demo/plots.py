"""The demo's figures (matplotlib, Agg): one run's losses and AP over iterations, the comparison of training
methods (mean curves over seeds, each run's final AP against the baseline's), and what the students detect on
validation tiles (the boxes drawn by detectron2's Visualizer)."""
import os
import statistics

import numpy as np

from .report import compare_table, methods_of
from .run import AP_KEYS, LOSS_KEYS, METHOD_LOSS_KEYS

__all__ = ["GT_COLOR", "PREDICTION_COLOR", "SCORE_THRESHOLD", "plot_compare", "plot_predictions", "plot_run"]

STUDENT_LOSSES = ("loss_cls", "loss_box_reg")
GT_COLOR, PREDICTION_COLOR = (1.0, 0.85, 0.0), (0.0, 0.9, 1.0)  # yellow ground truth, cyan detections (RGB 0-1)
SCORE_THRESHOLD = 0.5  # detections drawn in predictions.png: detectron2's demo default


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(record, path):
    """Losses and AP/AP50 of one run over iterations, as a PNG."""
    plt = _plt()
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
    curves = record["curves"]
    for key in LOSS_KEYS + METHOD_LOSS_KEYS:
        if key in curves:
            it, val = zip(*curves[key])
            ax_loss.plot(it, val, label=key, linestyle="--" if key.endswith("_tea") else "-")
    ax_loss.set(xlabel="iteration", ylabel="loss", yscale="log",
                title=f"{record['mode']} seed {record['seed']}: losses")
    ax_loss.legend(fontsize=8)
    for key in AP_KEYS:
        if key in curves:
            it, val = zip(*curves[key])
            ax_ap.plot(it, val, marker="o", label=key)
    ax_ap.set(xlabel="iteration", ylabel="COCO AP (%)", title="student, validation")
    ax_ap.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _mean_curve(records, key):
    """Iterations and mean value over the records of `key` (a sum of keys if key is a tuple), on shared iterations."""
    keys = key if isinstance(key, tuple) else (key,)
    per_run = []
    for rec in records:
        parts = [dict(map(tuple, rec["curves"].get(k, []))) for k in keys]
        shared = set.intersection(*(set(p) for p in parts)) if parts else set()
        per_run.append({i: sum(p[i] for p in parts) for i in shared})
    common = sorted(set.intersection(*(set(r) for r in per_run))) if per_run else []
    return common, [statistics.mean(r[i] for r in per_run) for i in common]


def plot_compare(records, path):
    """Side by side, every method (mean over seeds): the student's detection loss, AP/AP50 over iterations,
    and the final AP of each paired run against the baseline (bars per method, with the mean and its
    2-standard-error band)."""
    plt = _plt()
    fig, (ax_loss, ax_ap, ax_diff) = plt.subplots(1, 3, figsize=(16, 4))
    colors = dict(zip(methods_of(records), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2))
    colors.update({m: c for m, c in (("baseline", "tab:gray"), ("lgd", "tab:green")) if m in colors})
    for mode, color in colors.items():
        runs = [r for r in records if r["mode"] == mode]
        it, val = _mean_curve(runs, STUDENT_LOSSES)
        ax_loss.plot(it, val, color=color, label=f"{mode} (n={len(runs)})")
        for key, style in zip(AP_KEYS, ("-o", "--s")):
            it, val = _mean_curve(runs, key)
            ax_ap.plot(it, val, style, color=color, label=f"{mode} {key}")
    ax_loss.set(xlabel="iteration", ylabel="loss_cls + loss_box_reg", yscale="log", title="student detection loss")
    ax_ap.set(xlabel="iteration", ylabel="COCO AP (%)", title="student, validation (mean over seeds)")
    ax_loss.legend(fontsize=8)
    ax_ap.legend(fontsize=8)
    table = compare_table(records)
    diffs = [(m, table[f"{m} - baseline"]["AP"]) for m in colors if f"{m} - baseline" in table]
    width = 0.8 / max(len(diffs), 1)
    keys = list(dict.fromkeys(k for _, pairs in diffs for k in pairs["per_seed"]))
    for i, (mode, pairs) in enumerate(diffs):
        xs = [keys.index(k) + (i - (len(diffs) - 1) / 2) * width for k in pairs["per_seed"]]
        ax_diff.bar(xs, list(pairs["per_seed"].values()), width, color=colors[mode],
                    label=f"{mode}: {pairs['mean']:+.2f} ± 2 SE")
        ax_diff.axhline(pairs["mean"], color=colors[mode], linewidth=1)
        ax_diff.axhspan(pairs["mean"] - 2 * pairs["se"], pairs["mean"] + 2 * pairs["se"], color=colors[mode],
                        alpha=0.1)
    if diffs:
        ax_diff.axhline(0, color="k", linewidth=0.8)
        ax_diff.set_xticks(range(len(keys)), keys, rotation=45, fontsize=7)
        ax_diff.legend(fontsize=8)
    ax_diff.set(xlabel="run (seed/fold)", ylabel="AP difference (points)", title="final AP, method - baseline")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _draw_tile(image, gt_boxes, instances):
    """The tile (RGB) with the ground truth boxes and the detections, each in its colour, by the Visualizer."""
    from detectron2.utils.visualizer import Visualizer

    visualizer = Visualizer(image)
    detected = instances.pred_boxes.tensor.numpy()
    visualizer.overlay_instances(boxes=gt_boxes, assigned_colors=[GT_COLOR] * len(gt_boxes))
    visualizer.overlay_instances(boxes=detected, assigned_colors=[PREDICTION_COLOR] * len(detected))
    return visualizer.get_output().get_image()


def plot_predictions(tiles, images, predictions, path, threshold=SCORE_THRESHOLD):
    """A grid of validation tiles with their ground truth and each method's detections scoring >= threshold:
    one column per method (predictions: {mode: [Instances per tile]}, in column order), one row per tile; a
    single method's tiles fill a square grid instead. Returns the drawn panels {(mode, tile index): RGB array}."""
    from detectron2.structures import BoxMode
    from matplotlib.patches import Patch

    plt = _plt()
    modes = list(predictions)
    if len(modes) == 1:
        cols = int(np.ceil(np.sqrt(len(tiles))))
        rows, place = int(np.ceil(len(tiles) / cols)), (lambda m, t: divmod(t, cols))
    else:
        rows, cols, place = len(tiles), len(modes), (lambda m, t: (t, m))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.6 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    panels = {}
    for t, (tile, image) in enumerate(zip(tiles, images)):
        gt = np.array([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in tile["annotations"]],
                      dtype=np.float64).reshape(-1, 4)
        for m, mode in enumerate(modes):
            instances = predictions[mode][t]
            instances = instances[instances.scores >= threshold]
            panels[mode, t] = _draw_tile(image, gt, instances)
            ax = axes[place(m, t)]
            ax.imshow(panels[mode, t])
            ax.set_title(f"{mode}: {len(instances)} detected, {len(gt)} true\n{os.path.basename(tile['file_name'])}",
                         fontsize=8)
    fig.legend(handles=[Patch(edgecolor=GT_COLOR, fill=False, label="ground truth"),
                        Patch(edgecolor=PREDICTION_COLOR, fill=False, label=f"student, score >= {threshold}")],
               loc="lower center", ncol=2, fontsize=9)
    fig.suptitle("the student on validation tiles" if len(modes) == 1 else
                 "one column per method: its student (same seed) on the same validation tiles", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return panels
