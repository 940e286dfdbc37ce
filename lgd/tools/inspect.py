"""lgd-inspect: LGD at work on one annotated image of a run: its ground truth, the student's map after the
student-side adapter and the instructive knowledge X^I at one pyramid level (RGB of one shared PCA basis), the
per-cell distillation error and the relation adapter's attention between objects, drawn on one page (PNG) with
the numbers behind it (.npz). Argument parsing only: lgd.runner.inspect computes, lgd.runner.inspect_page draws."""
import argparse
import os
import sys

from detectron2.utils.logger import setup_logger

from ..config import load_config
from ..errors import UsageError
from ..runner import apply_dataset_arguments
from ..runner.inspect import inspect_image, save_inspection
from ..runner.inspect_page import draw_inspection
from ..runner.predict import config_test_dataset
from .cli import DEBUG_HELP, run_command
from .train_net import add_dataset_arguments

__all__ = ["build_parser", "main", "run"]

EPILOG = """example (the demo's LGD run, with the demo's config and its validation tiles registered by path):
  D=~/.cache/lgd/datasets/deepforest-2.1.0-tiles-v1-t400-o50
  lgd-inspect --config-file lgd/demo/configs/retinanet_mobilenetv2_lgd.py \\
              --checkpoint output/demo/lgd_seed0/model_final.pth --dataset lgd_demo_val=$D/val.json:$D \\
              --image-id 50 --output inspect_50.png

--checkpoint must be a run's checkpoint holding the instructive modules (teacher.*), not lgd-export's student.
The image is resized as the config's test loader resizes it. --output names the page; the .npz beside it (same
name) holds the maps ([C, H, W] and [H, W] on the level's grid of the padded input), the objects' boxes (input
pixels), classes and names (context last), the attention matrix (rows: queries), the PCA basis and the
per-level error sums with loss_distill. Neither is replaced without --overwrite. docs/method.md shows a page and
how to read it. Exit status 0, 2 (usage) or 1 (failure), as every lgd command."""


def build_parser():
    parser = argparse.ArgumentParser(prog="lgd-inspect", description=__doc__.split("\n\n")[0].split(". ")[0],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig of the run (lgd.method=lgd)")
    parser.add_argument("--checkpoint", required=True, help="the run's checkpoint, with its instructive modules")
    parser.add_argument("--image-id", required=True, help="the image's id in the dataset (COCO: image_id)")
    parser.add_argument("--dataset-name", metavar="NAME", default=None,
                        help="a registered dataset holding the image (default: the config's test dataset)")
    parser.add_argument("--level", default=None,
                        help="a distilled pyramid level, e.g. p4 (default: the one with the most object cells)")
    parser.add_argument("--output", default=None, metavar="PNG", help="the page (default: inspect_<ID>.png); the "
                        ".npz beside it")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing page and .npz")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    add_dataset_arguments(parser, train=False)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value LazyConfig overrides")
    return parser


def _outputs(args):
    page = args.output or f"inspect_{args.image_id}.png"
    if not page.endswith(".png"):
        raise UsageError(f"--output {page}: the page is a PNG; give a name ending in .png")
    outputs = (page, page[:-len(".png")] + ".npz")
    existing = [p for p in outputs if os.path.exists(p)]
    if existing and not args.overwrite:
        raise UsageError(f"--output: {existing[0]} exists: refusing to overwrite it",
                         hint="pass --overwrite to replace it, or choose another --output")
    return outputs


def run(argv=None):
    """lgd-inspect as a function: writes the page and the .npz, returns inspect_image's numbers; raises."""
    args = build_parser().parse_args(argv)
    page, numbers = _outputs(args)
    cfg = apply_dataset_arguments(load_config(args.config_file, args.opts), args)
    dataset = args.dataset_name or config_test_dataset(cfg)
    setup_logger(name="lgd")
    data = inspect_image(cfg, args.checkpoint, dataset, args.image_id, level=args.level)
    os.makedirs(os.path.dirname(os.path.abspath(page)), exist_ok=True)
    draw_inspection(data, page)
    save_inspection(data, numbers)
    print(f"lgd-inspect: {data['dataset']} image {data['image_id']} at {data['level']}: wrote {page}, {numbers}")
    return data


def main(argv=None):
    """Console script lgd-inspect: run(argv) -> exit status 0, 2 or 1 (lgd.tools.cli)."""
    return run_command("lgd-inspect", run, argv)


if __name__ == "__main__":
    sys.exit(main())
