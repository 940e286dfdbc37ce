"""Builds lgd_ops._C: the C++ CPU kernels always, the CUDA kernels whenever a CUDA toolkit is found.

Environment:
  LGD_OPS_NO_CUDA=1      skip the CUDA sources even if a toolkit is found
  FORCE_CUDA=1           fail instead of skipping when no toolkit is found
  CUDA_HOME              toolkit root (default: the directory of nvcc, or /usr/local/cuda)
  TORCH_CUDA_ARCH_LIST   GPU architectures (default "8.0;9.0+PTX": A100 and H100, PTX for newer)
Install with `pip install --no-build-isolation -e .` (this file imports torch).
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home():
    """The CUDA toolkit root, or None. Set before torch.utils.cpp_extension is imported, since
    torch guesses /usr/local when nvcc is a wrapper script outside the toolkit."""
    if os.environ.get("LGD_OPS_NO_CUDA", "0") == "1":
        return None
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isdir(
            os.path.join(root, "include")
        ):
            return root
    return None


CUDA_HOME = find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
elif os.environ.get("FORCE_CUDA", "0") == "1":
    sys.exit("setup.py: FORCE_CUDA=1 but no CUDA toolkit found (set CUDA_HOME)")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def sources(pattern):
    """csrc/ files matching pattern, without csrc/tests/ (the ctest programs)."""
    found = glob.glob(os.path.join(ROOT, "csrc", pattern))
    return sorted(os.path.relpath(p, ROOT) for p in found if os.sep + "tests" + os.sep not in p)


def extension():
    cpp = sources("module.cpp") + sources("*/*.cpp") + sources("*/cpu/*.cpp")
    cuda = sources("*/cuda/*.cu")
    # torch supplies the C++ standard (C++20 for torch 2.14). at::parallel_for is inline OpenMP code:
    # without -fopenmp the CPU kernels would silently run on one thread.
    cxx = ["-O3", "-fopenmp"]
    if CUDA_HOME and cuda:
        # cusparse.h (pulled in by ATen/cuda/CUDAContext.h) ships in the nvidia wheels, not always
        # in the toolkit.
        include_dirs = glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*", "include"))
        print(f"lgd_ops: building CPU + CUDA kernels ({len(cpp)} C++ and {len(cuda)} CUDA sources, "
              f"CUDA_HOME={CUDA_HOME}, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
        return CUDAExtension(
            "lgd_ops._C",
            cpp + cuda,
            include_dirs=include_dirs,
            define_macros=[("LGD_OPS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"],
        )
    why = "LGD_OPS_NO_CUDA=1" if os.environ.get("LGD_OPS_NO_CUDA") == "1" else (
        "no CUDA sources" if not cuda else "no CUDA toolkit found")
    print(f"lgd_ops: building CPU kernels only ({len(cpp)} C++ sources; {why})")
    return CppExtension("lgd_ops._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """Objects go to build/temp-<python> in the tree, not to the fresh temporary directory of each pip
    install, so ninja recompiles only the sources (or headers) that changed."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", f"temp-{sys.implementation.cache_tag}")


setup(
    name="lgd",
    version="0.1.0",
    description="Label-Guided self-Distillation (LGD) for object detection on detectron2, with fused ops",
    packages=find_packages(include=["lgd", "lgd.*", "lgd_ops", "lgd_ops.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExt},
    python_requires=">=3.10",
    entry_points={"console_scripts": [
        "lgd-train=lgd.tools.train_net:main",
        "lgd-eval=lgd.tools.eval_net:main",
        "lgd-export=lgd.tools.export:main",
        "lgd-demo=lgd.tools.demo:main",
        "lgd-bench=lgd.tools.bench:main",
        "lgd-predict=lgd.tools.predict:main",
        "lgd-inspect=lgd.tools.inspect:main",
    ]},
)
