"""What can be checked of the GPU machine's run without a GPU: the test suite collects where
detectron2 and pycocotools are missing (as on that machine)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_suite_collects_without_detectron2_and_pycocotools(tmp_path):
    """Every module that needs them skips itself (pytest.importorskip) instead of failing collection."""
    for name in ("detectron2", "pycocotools"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('{name} hidden by test_gpu_check')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0 and "ERROR" not in out, out[-4000:]
    assert "tests/test_box_pool.py::" in out and "tests/test_lgd_distiller.py::" not in out, out[-4000:]
