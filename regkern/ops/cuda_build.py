"""How the CUDA extension is built: sources, compiler flags, default architectures, where the sources are.

The one place for these facts, read by ``setup.py`` (ahead-of-time build of ``regkern._C``) and by
``regkern.ops.cuda_ext`` (the just-in-time build). It imports nothing but the standard library, so ``setup.py`` can
load it by path in a build environment without torch.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional

__all__ = [
    "SOURCES",
    "DEFAULT_ARCHS",
    "EXTENSION_NAME",
    "build_flags",
    "source_dir",
    "sources",
    "source_files",
    "nvcc_wrapper_target",
]

#: the translation units of the extension, relative to the sources folder
SOURCES = ("ops.cpp", "attention.cu", "layer_norm.cu", "embed_tokens.cu")
#: GPU architectures compiled for when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible (A100, H100/H200)
DEFAULT_ARCHS = "8.0;9.0"
#: the ahead-of-time module's import name
EXTENSION_NAME = "regkern._C"
#: what the package ships of csrc/ (a wheel has no checkout beside it): sources, headers, the emulator
SHIPPED_PATTERNS = ("*.cpp", "*.cu", "*.cuh", "*.h", "emulation/*.cpp", "emulation/*.h")


def build_flags() -> tuple[list[str], list[str]]:
    """(host compiler flags, nvcc flags); the C++ standard is left to torch's builder (the one that torch needs)."""
    cxx = ["-O3", "-DREGKERN_WITH_CUDA"]
    nvcc = ["-O3", "-lineinfo", "-DREGKERN_WITH_CUDA"]
    return cxx, nvcc


def source_dir() -> Optional[Path]:
    """The csrc/ folder: shipped inside the installed package (``regkern/csrc``), or the checkout's top-level
    ``csrc/`` beside ``regkern/`` (editable installs, source trees); None when neither exists."""
    package = Path(__file__).resolve().parent.parent  # regkern/
    for candidate in (package / "csrc", package.parent / "csrc"):
        if all((candidate / name).is_file() for name in SOURCES):
            return candidate
    return None


def sources(root: Path) -> list[Path]:
    """The translation units under ``root``."""
    return [root / name for name in SOURCES]


def source_files(root: Path) -> list[Path]:
    """Every file of csrc/ that the package ships (sorted, relative paths resolved under ``root``)."""
    found = set()
    for pattern in SHIPPED_PATTERNS:
        found.update(p for p in root.glob(pattern) if p.is_file())
    return sorted(found)


def nvcc_wrapper_target(nvcc: Optional[str] = None) -> Optional[Path]:
    """The toolkit behind an ``nvcc`` that is a wrapper script (``exec /path/to/cuda/bin/nvcc "$@"``), or behind a
    symlink to a real nvcc; None when there is no nvcc on PATH or it names no toolkit."""
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        return None
    real = Path(os.path.realpath(nvcc))
    try:
        head = real.read_bytes()[:4096].decode("utf-8", "replace")
    except OSError:
        return None
    found = re.search(r"exec\s+(\S+/bin/nvcc)\b", head)
    if found:
        return Path(found.group(1)).parent.parent
    toolkit = real.parent.parent
    return toolkit if (toolkit / "include" / "cuda_runtime.h").is_file() else None
