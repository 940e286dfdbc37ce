"""lgd-bench: the project's benchmarks behind one command (also `python -m lgd.tools.bench ...`).

    lgd-bench ops   [bench_ops options]     benchmarks/bench_ops.py: the fused ops vs the reference
    lgd-bench train [bench_train options]   benchmarks/bench_train.py: baseline vs LGD training steps

The scripts live in the source tree next to lgd/ (a source checkout or an editable install); `lgd-bench ops
--help` lists their options. The tree's root is put on PYTHONPATH so their child processes import lgd and lgd_ops.
"""
import os
import runpy
import sys

SCRIPTS = {"ops": "bench_ops.py", "train": "bench_train.py"}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the source tree


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in SCRIPTS:
        raise SystemExit(f"usage: lgd-bench {{{'|'.join(SCRIPTS)}}} [options]   (lgd-bench ops --help)")
    script = os.path.join(ROOT, "benchmarks", SCRIPTS[argv[0]])
    if not os.path.isfile(script):
        raise SystemExit(f"lgd-bench: {script} not found: the benchmarks need a source checkout of lgd")
    os.environ["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    runpy.run_path(script)["main"](argv[1:], prog=f"lgd-bench {argv[0]}")


if __name__ == "__main__":
    main()
