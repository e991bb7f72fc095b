"""Build entry for regkern.

The pure-Python package always installs. The CUDA extension ``regkern._C`` (csrc/) is compiled here when a
CUDA-enabled torch and nvcc are importable/visible to this build, i.e. with ``pip install --no-build-isolation -e .``
(pip's default isolated build has no torch, so it installs the Python package only; the extension is then built
just in time on first use, see ``regkern.cuda_ext``).

Environment:
    REGKERN_BUILD_CUDA    "auto" (default): build when possible, say why not otherwise; "1": build or fail;
                          "0": never build.
    TORCH_CUDA_ARCH_LIST  GPU architectures to compile for; default "8.0;9.0" (A100, H100/H200).
    MAX_JOBS              parallel compile jobs (ninja).
    CUDA_HOME             the CUDA toolkit (the directory above bin/nvcc).
"""

import os
import sys

from setuptools import find_packages, setup

CSRC = ["csrc/ops.cpp", "csrc/attention.cu", "csrc/layer_norm.cu", "csrc/embed_tokens.cu"]
DEFAULT_ARCHS = "8.0;9.0"


def cuda_build_flags():
    """Compiler flags shared with the just-in-time build (regkern/cuda_ext.py keeps a copy in sync); the C++
    standard is left to torch's builder (C++17 or C++20, whichever that torch needs)."""
    cxx = ["-O3", "-DREGKERN_WITH_CUDA"]
    nvcc = ["-O3", "-lineinfo", "-DREGKERN_WITH_CUDA"]
    return cxx, nvcc


def cuda_extension():
    """([extension], {"build_ext": BuildExtension}) or ([], {}) with the reason printed."""
    mode = os.environ.get("REGKERN_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "1", "0"):
        raise SystemExit(f"REGKERN_BUILD_CUDA: expected 'auto', '1' or '0', got {mode!r}")
    if mode == "0":
        print("regkern: REGKERN_BUILD_CUDA=0, not building the CUDA extension", file=sys.stderr)
        return [], {}

    def skip(why):
        if mode == "1":
            raise SystemExit(f"regkern: REGKERN_BUILD_CUDA=1 but the CUDA extension cannot be built: {why}")
        print(f"regkern: not building the CUDA extension ({why}); it is built just in time on first use",
              file=sys.stderr)
        return [], {}

    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as err:
        return skip(f"torch is not importable in this build environment ({err}); use --no-build-isolation")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is built without CUDA")
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return skip(f"no CUDA toolkit found (CUDA_HOME={CUDA_HOME!r}); set CUDA_HOME to the directory above bin/nvcc")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    cxx, nvcc = cuda_build_flags()
    ext = CUDAExtension("regkern._C", CSRC, extra_compile_args={"cxx": cxx, "nvcc": nvcc})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()

setup(
    name="regkern",
    version="0.1.0",
    description="Fused GPU attention kernels for Vision Transformers with register tokens",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["regkern", "regkern.*"]),
    package_data={"regkern": ["dispatch_table.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.9",
    install_requires=["torch>=2.3", "triton", "timm>=1.0.20", "torchvision", "numpy", "ninja", "safetensors", "matplotlib", "tqdm"],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4"],
        "xformers": ["xformers"],
    },
    entry_points={"console_scripts": ["regkern=regkern.cli:main"]},
)
