"""lgd-inspect's page (matplotlib, Agg): one figure answering "what does LGD distil on this image?" from
lgd.runner.inspect.inspect_image's numbers. The image with its numbered ground truth (detectron2's Visualizer);
at one level the student's map after F_adapt and X^I as RGB in one shared PCA basis, so a colour means the same
direction in both; the per-cell normalized squared error; the relation adapter's attention between objects; and
the mean per-cell error of every distilled level."""
import os
from typing import Dict

from detectron2.utils.visualizer import Visualizer

__all__ = ["draw_inspection"]

MAX_TICKS = 30  # attention ticks labelled, at most (every k-th object beyond that)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _labels(data):
    return [("context" if name == "context" else f"{i} {name}") for i, name in enumerate(data["class_names"])]


def _on_input_grid(ax, data, picture, title, **kwargs):
    """`picture` (a level map) over the padded input in input pixels, cropped to the image, boxes outlined."""
    in_h, in_w = data["padded_size"]
    height, width = data["image_size"]
    shown = ax.imshow(picture, extent=(0, in_w, in_h, 0), interpolation="nearest", **kwargs)
    for (x0, y0, x1, y1), name in zip(data["boxes"], data["class_names"]):
        if name != "context":
            ax.add_patch(_rectangle((x0, y0), x1 - x0, y1 - y0))
    ax.set(xlim=(0, width), ylim=(height, 0), title=title, xlabel="x (input px)", ylabel="y (input px)")
    return shown


def _rectangle(xy, w, h):
    from matplotlib.patches import Rectangle

    return Rectangle(xy, w, h, fill=False, edgecolor="white", linewidth=0.6, alpha=0.7)


def draw_inspection(data: Dict, path: str) -> None:
    """The page of inspect_image's `data` as a PNG at `path` (100 dpi)."""
    plt = _plt()
    fig = plt.figure(figsize=(16, 10.5))
    grid = fig.add_gridspec(2, 3, height_ratios=(1, 1.15))
    objects = [i for i, name in enumerate(data["class_names"]) if name != "context"]
    height, width = data["image_size"]
    drawn = Visualizer(data["image"]).overlay_instances(
        boxes=data["boxes"][objects], labels=[str(i) for i in objects]).get_image()
    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(drawn, extent=(0, width, height, 0))
    ax.set(title=f"{data['dataset']} image {data['image_id']}: {len(objects)} objects (numbered)",
           xlabel="x (input px)", ylabel="y (input px)")
    level, (rows, cols) = str(data["level"]), data["error"].shape
    _on_input_grid(fig.add_subplot(grid[0, 1]), data, data["student_rgb"],
                   f"student F_adapt(X) at {level}: PCA 1-3 as RGB")
    _on_input_grid(fig.add_subplot(grid[0, 2]), data, data["instructive_rgb"],
                   f"instructive X^I at {level}: the same PCA basis")
    ax = fig.add_subplot(grid[1, 0])
    shown = _on_input_grid(ax, data, data["error"], f"per-cell error at {level} ({rows}x{cols} cells)",
                           cmap="magma", vmin=0)
    fig.colorbar(shown, ax=ax, shrink=0.8, label="Σ_c (IN(student) − IN(X^I))²")
    _attention(fig.add_subplot(grid[1, 1]), data, level)
    ax = fig.add_subplot(grid[1, 2])
    levels = [str(k) for k in data["levels"]]
    per_cell = data["error_sums"] / (data["error_sizes"] / data["student"].shape[0])  # sizes are C * H * W
    ax.bar(levels, per_cell, color=["tab:orange" if k == level else "tab:gray" for k in levels])
    ax.set(xlabel="pyramid level", ylabel="mean per-cell error", title="distillation error per level (shown: orange)")
    loss = data["loss_distill"]
    fig.suptitle(f"LGD on {os.path.basename(str(data['file_name']))}: level {level} of {', '.join(levels)}; "
                 f"this image's loss_distill {loss:.4f}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _attention(ax, data, level):
    """The relation adapter's head-averaged attention, query objects by key objects (none for a fill variant)."""
    attention = data["attention"]
    if attention.size == 0:
        ax.set_axis_off()
        ax.text(0.5, 0.5, f"no relation attention:\nlgd.interaction={data['interaction']}\npaints the embeddings "
                "directly", ha="center", va="center", transform=ax.transAxes)
        return
    # colours span the weights' own range: a nearly uniform attention (every weight ~1/n) still shows its structure
    shown = ax.imshow(attention, cmap="viridis", interpolation="nearest")
    labels = _labels(data)
    step = max(1, -(-len(labels) // MAX_TICKS))
    ticks = list(range(0, len(labels), step)) + ([len(labels) - 1] if (len(labels) - 1) % step else [])
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=8)
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=8)
    appearance, label = f"object's appearance at {level}", "object's label embedding"
    query, key = (appearance, label) if str(data["attention_query"]) == "student" else (label, appearance)
    ax.set(xlabel=f"key: {key}", ylabel=f"query: {query}",
           title=f"relation attention (mean over heads)\neach row sums to 1; uniform = 1/{len(labels)}")
    ax.figure.colorbar(shown, ax=ax, shrink=0.8, label="attention weight")
