"""lgd-bench train: the cost of an LGD training step against the baseline's, and of each training method.

Variants (the default): baseline, LGD with the reference ops and LGD with the fused ops, each built by lgd.runner
from the detector's LGD config and trained on one synthetic batch in its own process, in fp32 and on the fast
path; a profiled step gives the per-component breakdown. --methods instead prices whole training methods
(lgd.benchmarks.methods). Outputs: train_<device>.{csv,json,md,png} or methods_<device>.* under --out.
"""
import argparse
import json
import os
import sys
import time

import torch

from lgd_ops.benchmark import ArgumentParser, device_name, git_commit, triton_version, write_outputs

from lgd.methods import method_names

from .methods import method_child, run_methods
from .steps import COMPONENTS, DETECTORS, MODES, VARIANTS, child, run_child

__all__ = ["main", "parse_args"]

EPILOG = """\
Each (detector, variant, mode) runs in a fresh child process: one warm-up step, --iters timed steps (median,
20th/80th percentiles), one step for peak memory (beyond weights, gradients and optimizer state), one profiled
step for the breakdown. The learning rate is 0, so random weights stay put. LGD runs with distillation on and
the backbone unfrozen (its cost after the warm-up).

  lgd-bench train                                              # RetinaNet/FCOS/Faster R-CNN R50, 2 x 256x320
  lgd-bench train --detectors retinanet --image 384 512 --modes fp32 fast --threads 2
  lgd-bench train --detectors retinanet faster_rcnn --methods baseline lgd fgfi labelenc dml ban tfkd --modes fast
"""


def parse_args(argv=None, prog=None):
    parser = ArgumentParser(prog=prog, description=__doc__, epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detectors", nargs="+", choices=sorted(DETECTORS), default=list(DETECTORS))
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                      help=f"the step comparison and its breakdown (default: {' '.join(VARIANTS)})")
    runs.add_argument("--methods", nargs="+", choices=method_names(), default=None,
                      help="training methods (lgd.method) as lgd-train builds them, their stages included: the cost "
                           "table (step time, peak memory, total cost of the config's schedule; ratios to "
                           "'baseline' when it is among them) instead of the variants")
    parser.add_argument("--overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="with --methods: lgd-train's key=value overrides of every detector's config, e.g. "
                             "+lgd.ban.generations=3 +lgd.labelenc.step1_iters=120000")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES),
                        help="precision x memory format: fp32 (fp32 NCHW) and/or fast (lgd-train --fast: "
                             "train.amp.enabled with train.amp.precision=bf16 and channels_last)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=2, help="images per step")
    parser.add_argument("--image", type=int, nargs=2, default=[256, 320], metavar=("H", "W"))
    parser.add_argument("--objects", type=int, default=7, help="objects per image (COCO's mean is ~7)")
    parser.add_argument("--iters", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default); 1 is steadier on a shared machine")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "train_step"),
                        help="output folder (default: benchmarks/results/train_step)")
    parser.add_argument("--child", nargs=3, metavar=("DETECTOR", "VARIANT", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--child-method", nargs=4, metavar=("DETECTOR", "METHOD", "MODE", "RUN"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.overrides and args.methods is None and args.child_method is None:
        parser.error("--overrides needs --methods (the variants are built from the configs as they are)")
    if args.methods is None and args.variants is None:
        args.variants = list(VARIANTS)
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    for name in ("batch", "objects", "iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if min(args.image) < 32:
        parser.error(f"--image must be at least 32 x 32, got {args.image}")
    return args


def _case(variant, mode):
    return variant if mode == "fp32" else f"{variant} {mode}"


def targets(variants):
    """The fast path's targets from one detector's results, as (name, value, bound) rows:
    LGD fused fast step / fp32 baseline step, / fp32 LGD fused step, and LGD's extra peak memory (vs the
    baseline of the same mode) fast / fp32."""
    def get(var, mode, key):
        r = variants.get(_case(var, mode), {})
        return r[key][1] if key == "step_ms" and key in r else r.get(key)

    rows = []
    fast, base, lgd = get("lgd_fused", "fast", "step_ms"), get("baseline", "fp32", "step_ms"), \
        get("lgd_fused", "fp32", "step_ms")
    if fast and base:
        rows.append(("LGD fast step / fp32 baseline step", fast / base, 0.6))
    if fast and lgd:
        rows.append(("LGD fast step / fp32 LGD step", fast / lgd, 0.3))
    extra = {m: (get("lgd_fused", m, "peak_mb"), get("baseline", m, "peak_mb")) for m in ("fast", "fp32")}
    if all(a is not None and b is not None for a, b in extra.values()) and extra["fp32"][0] > extra["fp32"][1]:
        rows.append(("LGD extra peak MB fast / fp32", (extra["fast"][0] - extra["fast"][1])
                     / (extra["fp32"][0] - extra["fp32"][1]), 0.6))
    return rows


def tables(results, stamp, args):
    """The step table (time, peak memory, ratios to the fp32 baseline and to the same mode's baseline), the
    targets and the breakdown table, as markdown."""
    lines = [f"LGD training step, {stamp['device']}, torch {stamp['torch']}, commit {stamp['commit']}, "
             f"{stamp['date']}, {stamp['threads']} threads, load {stamp.get('load', '-')}: batch {args.batch} x "
             f"{args.image[0]}x{args.image[1]}, {args.objects} objects/image, median of {args.iters} steps (p20-p80); "
             "peak = memory beyond weights, grads and optimizer state. fast = lgd-train --fast (see precision).", "",
             "| detector | variant | precision | step ms (p20-p80) | vs fp32 baseline | vs baseline (same mode) "
             "| peak MB | + MB vs baseline (same mode) | teacher copies (ms) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    skipped = []
    for det, variants in results.items():
        base32 = variants.get("baseline", {})
        for case, r in variants.items():
            if "skipped" in r:
                skipped.append(f"- {det} / {case}: skipped ({r['skipped']})")
                continue
            mode = case.split(" ")[1] if " " in case else "fp32"
            base = variants.get(_case("baseline", mode), {})
            lo, mid, hi = r["step_ms"]
            ratio32 = f"{mid / base32['step_ms'][1]:.2f}x" if "step_ms" in base32 else "-"
            ratio = f"{mid / base['step_ms'][1]:.2f}x" if "step_ms" in base else "-"
            extra = f"{r['peak_mb'] - base['peak_mb']:+.0f}" if "peak_mb" in base else "-"
            copies = f"{r['teacher_copies']} ({r['teacher_copy_ms']:.1f})" if "teacher_copies" in r and \
                not case.startswith("baseline") else "-"
            lines.append(f"| {det} | {case} | {r.get('precision', '-')} | {mid:.0f} ({lo:.0f}-{hi:.0f}) | {ratio32} | "
                         f"{ratio} | {r['peak_mb']:.0f} | {extra} | {copies} |")
    target_rows = [(det, *row) for det, variants in results.items() for row in targets(variants)]
    if target_rows:
        lines += ["", "Targets of the fast path (LGD with the fused ops):", "",
                  "| detector | ratio | value | target | met |",
                  "|---|---|---:|---:|---|"]
        lines += [f"| {det} | {name} | {value:.2f} | <= {bound} | {'yes' if value <= bound else 'no'} |"
                  for det, name, value, bound in target_rows]
    lines += ["", "Breakdown of one profiled step (ms: forward of each component; backward and optimizer in total):",
              "",
              "| detector | variant | " + " | ".join(COMPONENTS) + " |", "|---|---|" + "---:|" * len(COMPONENTS)]
    for det, variants in results.items():
        for var, r in variants.items():
            if "breakdown" in r:
                lines.append(f"| {det} | {var} | " + " | ".join(
                    f"{r['breakdown'][c]:.1f}" if c in r["breakdown"] else "-" for c in COMPONENTS) + " |")
    return "\n".join(lines + ([""] + skipped if skipped else []))


def plot(results, path):
    """One stacked bar per (detector, variant): the components' ms of the profiled step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{d}\n{v}", r["breakdown"]) for d, vs in results.items() for v, r in vs.items() if "breakdown" in r]
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(bars), 5))
    bottom = [0.0] * len(bars)
    cmap = plt.get_cmap("tab20")
    for i, comp in enumerate(COMPONENTS):
        values = [b.get(comp, 0.0) for _, b in bars]
        if any(values):
            ax.bar(range(len(bars)), values, bottom=bottom, label=comp, color=cmap(i))
            bottom = [x + y for x, y in zip(bottom, values)]
    ax.set_xticks(range(len(bars)), [label for label, _ in bars], fontsize=8)
    ax.set_ylabel("ms (profiled step)")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def run_variants(args, stamp, device):
    """The variants' step comparison and breakdown (module docstring); writes train_<device>.*."""
    from tqdm import tqdm

    results, rows = {}, []
    cases = [(d, v, m) for d in args.detectors for m in args.modes for v in args.variants]
    for det, var, mode in tqdm(cases, desc="bench_train", file=sys.stderr):
        r = run_child(["--child", det, var, mode], args)
        case = _case(var, mode)
        results.setdefault(det, {})[case] = r
        if "skipped" in r:
            print(f"  {det} / {case}: skipped ({r['skipped']})", flush=True)
            continue
        print(f"  {det} / {case}: step {r['step_ms'][1]:.0f} ms, peak {r['peak_mb']:.0f} MB ({r['precision']}), "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
        key = dict(detector=det, variant=var, mode=mode, precision=r["precision"], batch=args.batch,
                   image=f"{args.image[0]}x{args.image[1]}", objects=args.objects)
        rows.append(dict(key, metric="step_ms", p20=r["step_ms"][0], p50=r["step_ms"][1], p80=r["step_ms"][2], **stamp))
        rows.append(dict(key, metric="peak_mb", p20=r["peak_mb"], p50=r["peak_mb"], p80=r["peak_mb"], **stamp))
        for comp, ms in r["breakdown"].items():
            rows.append(dict(key, metric=f"{comp}_ms", p20=ms, p50=ms, p80=ms, **stamp))
        for metric in ("teacher_copies", "teacher_copy_ms"):
            rows.append(dict(key, metric=metric, p20=r[metric], p50=r[metric], p80=r[metric], **stamp))
    table = tables(results, stamp, args)
    print("\n" + table)
    base = os.path.join(args.out, f"train_{device.type}")
    write_outputs(base, rows, {"stamp": stamp, "args": vars(args), "results": results}, table)
    png = plot(results, base + ".png")
    print(f"\nwrote {base}.csv, .json, .md" + (f", {os.path.basename(png)}" if png else ""))
    return results


def main(argv=None, prog=None):
    args = parse_args(sys.argv[1:] if argv is None else argv, prog)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        det, var, mode = args.child
        print(json.dumps(child(det, var, args.device, args.batch, tuple(args.image), args.objects, args.iters, mode)))
        return None
    if args.child_method:
        det, method, mode, run = args.child_method
        print(json.dumps(method_child(det, method, run, args.device, args.batch, tuple(args.image), args.objects,
                                      args.iters, mode, args.overrides)))
        return None
    device = torch.device(args.device)
    stamp = {"device": device_name(device), "torch": torch.__version__, "triton": triton_version(),
             "commit": git_commit(), "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M"),
             "load": "/".join(f"{x:.2f}" for x in os.getloadavg())}
    print(f"# LGD training-step benchmark: {stamp}", flush=True)
    return run_methods(args, stamp, device) if args.methods else run_variants(args, stamp, device)


if __name__ == "__main__":
    main()
