"""lgd-bench: the project's benchmarks behind one command, from the installed package (any directory).

    lgd-bench ops   [options]   lgd_ops.bench_ops: the fused ops against the reference
    lgd-bench train [options]   lgd.benchmarks.train: LGD's training step and the methods' cost

`lgd-bench ops --help` and `lgd-bench train --help` list the options.
"""
import importlib
import sys

COMMANDS = {"ops": "lgd_ops.bench_ops", "train": "lgd.benchmarks.train"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: lgd-bench {{{'|'.join(COMMANDS)}}} [options]   (lgd-bench ops --help)")
    importlib.import_module(COMMANDS[argv[0]]).main(argv[1:], prog=f"lgd-bench {argv[0]}")


if __name__ == "__main__":
    main()
