"""Build entry for regkern: the optional CUDA extension and the csrc/ sources shipped as package data.

Metadata, dependencies and the version live in pyproject.toml. The pure-Python package always installs. The CUDA
extension ``regkern._C`` (csrc/) is compiled here when a CUDA-enabled torch and nvcc are importable/visible to this
build, i.e. with ``pip install --no-build-isolation .`` (pip's default isolated build has no torch, so it installs the
Python package only; the extension is then built just in time on first use, see ``regkern.ops.cuda_ext``).

Every non-editable build copies csrc/ into the package (``regkern/csrc``), so an installed wheel can still build the
extension just in time; csrc/ itself stays at the top of the repository.

Environment:
    REGKERN_BUILD_CUDA    "auto" (default): build when possible, say why not otherwise; "1": build or fail;
                          "0": never build.
    TORCH_CUDA_ARCH_LIST  GPU architectures to compile for; default "8.0;9.0" (A100, H100/H200).
    MAX_JOBS              parallel compile jobs (ninja).
    CUDA_HOME             the CUDA toolkit (the directory above bin/nvcc); found behind the nvcc on PATH otherwise.
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

ROOT = Path(__file__).resolve().parent


def _load_cuda_build():
    # by path, not `import regkern`: the build environment may have no torch
    spec = importlib.util.spec_from_file_location("regkern_cuda_build", ROOT / "regkern" / "ops" / "cuda_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cuda_build = _load_cuda_build()


class BuildPyWithSources(build_py):
    """build_py that also copies csrc/ into the built package as regkern/csrc (not for editable installs, which
    find the checkout's csrc/ beside regkern/)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        source = ROOT / "csrc"
        files = cuda_build.source_files(source)
        missing = [name for name in cuda_build.SOURCES if source / name not in files]
        if missing:  # a wheel without them could never build the extension just in time: fail the build instead
            raise SystemExit(f"regkern: csrc/ sources missing from this source tree: {', '.join(missing)}")
        target = Path(self.build_lib) / "regkern" / "csrc"
        for path in files:
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination)


class SdistWithSources(sdist):
    """sdist that carries csrc/ (the wheels built from it ship it as package data)."""

    def make_release_tree(self, base_dir, files):
        extra = [str(p.relative_to(ROOT)) for p in cuda_build.source_files(ROOT / "csrc")]
        super().make_release_tree(base_dir, sorted(set(files) | set(extra)))


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
        print(
            f"regkern: not building the CUDA extension ({why}); it is built just in time on first use", file=sys.stderr
        )
        return [], {}

    found_how = "CUDA_HOME" if os.environ.get("CUDA_HOME") else "CUDA_PATH" if os.environ.get("CUDA_PATH") else ""
    if not found_how:
        toolkit = cuda_build.nvcc_wrapper_target()
        if toolkit is not None and (toolkit / "include" / "cuda_runtime.h").is_file():
            os.environ["CUDA_HOME"] = str(toolkit)  # read by torch's builder when it is imported below
            found_how = f"behind {shutil.which('nvcc')}"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as err:
        return skip(f"torch is not importable in this build environment ({err}); use --no-build-isolation")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is built without CUDA")
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return skip(f"no CUDA toolkit found (CUDA_HOME={CUDA_HOME!r}); set CUDA_HOME to the directory above bin/nvcc")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", cuda_build.DEFAULT_ARCHS)
    print(
        f"regkern: building the CUDA extension with the toolkit at {CUDA_HOME} ({found_how or 'found by torch'}) "
        f"for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}",
        file=sys.stderr,
    )
    cxx, nvcc = cuda_build.build_flags()
    sources = [str(p.relative_to(ROOT)) for p in cuda_build.sources(ROOT / "csrc")]
    ext = CUDAExtension(cuda_build.EXTENSION_NAME, sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()
cmdclass["build_py"] = BuildPyWithSources
cmdclass["sdist"] = SdistWithSources

setup(ext_modules=ext_modules, cmdclass=cmdclass)
