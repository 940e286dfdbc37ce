"""lgd-predict: a trained student detector on image files, as detectron2's demo/demo.py: one PNG per image with
the boxes, class names and scores drawn by detectron2's Visualizer, and predictions.json in COCO's results format.
Argument parsing only: lgd.runner.predict lists the inputs, loads the model and predicts."""
import argparse
import os
import re
import sys

from detectron2.utils.logger import setup_logger

from ..config import load_config
from ..errors import UsageError
from ..runner import apply_dataset_arguments
from ..runner.predict import Predictor, dataset_metadata, list_inputs, output_names, predict_files
from .cli import DEBUG_HELP, run_command
from .train_net import add_dataset_arguments

__all__ = ["build_parser", "main", "run"]

EPILOG = """examples:
  lgd-predict --config-file output/lgd_r50_1x/config.yaml --checkpoint output/lgd_r50_1x/model_final.pth \\
              --input photos/ --output output/predictions
  D=~/.cache/lgd/datasets/deepforest-2.1.0-tiles-v1-t400-o50   # the demo's tiles: their class names
  lgd-predict --config-file lgd/demo/configs/retinanet_mobilenetv2_lgd.py --checkpoint student.pth \\
              --input 'tiles/*.png' --output out/ --confidence-threshold 0.3 --dataset lgd_demo_val=$D/val.json:$D

--checkpoint: a run's checkpoint or lgd-export's student file; one that does not fit the config is refused
before any image is read. --input: files, folders (their files) or globs; a file that is not a readable
image is named on one line and skipped. --output: a folder receiving <stem>.png per image and predictions.json
(COCO results: image_id = the file's position among the inputs, from 1, with its file_name; bbox x, y, w, h in
the image's pixels). Class names come from the config's test dataset (--dataset NAME=ann.json:images/
registers it). Existing files there are replaced only with --overwrite. key=value config overrides come last.
Exit status 0, 2 (usage) or 1 (failure), as every lgd command."""
OVERRIDE = re.compile(r"^\+?[A-Za-z_][\w.]*=")


def build_parser():
    parser = argparse.ArgumentParser(prog="lgd-predict", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE",
                        help="LazyConfig of the run: its OUTPUT/config.yaml")
    parser.add_argument("--checkpoint", required=True, help="a run's checkpoint or lgd-export's student (.pth)")
    parser.add_argument("--input", required=True, nargs="+", metavar="IMG|DIR|GLOB", help="images to predict")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the drawn PNGs and predictions.json")
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="keep detections scoring at least this (default 0.5, as detectron2's demo)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per model call (default 4)")
    parser.add_argument("--overwrite", action="store_true", help="replace files of an earlier prediction in --output")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    add_dataset_arguments(parser, train=False)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value LazyConfig overrides")
    return parser


def parse_args(argv=None):
    """The arguments, with key=value overrides given after --input's files moved to opts."""
    args = build_parser().parse_args(argv)
    overrides = [a for a in args.input if OVERRIDE.match(a) and not os.path.exists(a)]
    args.input = [a for a in args.input if a not in overrides]
    args.opts = overrides + list(args.opts)
    if not args.input:
        raise UsageError("--input: give at least one image, folder or glob before the key=value overrides")
    if not 0.0 <= args.confidence_threshold <= 1.0:
        raise UsageError(f"--confidence-threshold must be in [0, 1], got {args.confidence_threshold}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


def run(argv=None):
    """lgd-predict as a function: inputs and outputs checked, then the model loaded (its checkpoint checked),
    then the images predicted. Returns predict_files' summary; raises."""
    args = parse_args(argv)
    files = list_inputs(args.input)
    outputs = output_names(files, args.output, args.overwrite)
    cfg = apply_dataset_arguments(load_config(args.config_file, args.opts), args)
    setup_logger(name="lgd")
    predictor = Predictor(cfg, args.checkpoint)
    summary = predict_files(predictor, files, outputs, args.output, dataset_metadata(cfg),
                            confidence_threshold=args.confidence_threshold, batch_size=args.batch_size)
    skipped = len(summary["skipped"])
    print(f"lgd-predict: {summary['images']} images, {summary['detections']} detections >= "
          f"{args.confidence_threshold} drawn to {args.output}/, {summary['predictions']}"
          + (f"; {skipped} of {len(files)} inputs skipped (not readable images, named above)" if skipped else ""))
    return summary


def main(argv=None):
    """Console script lgd-predict: run(argv) -> exit status 0, 2 or 1 (lgd.tools.cli)."""
    return run_command("lgd-predict", run, argv)


if __name__ == "__main__":
    sys.exit(main())
