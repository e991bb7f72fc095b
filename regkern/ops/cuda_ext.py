"""Loading the CUDA extension (csrc/): the prebuilt ``regkern._C`` or a just-in-time build, and why not.

Nothing here runs at ``import regkern``: the extension is looked for the first time the "cuda" backend is asked
about. Loading it registers the ops ``regkern::cuda_attention_fwd``, ``regkern::cuda_layer_norm_fwd`` and
``regkern::cuda_embed_tokens`` (schemas and CPU/CUDA kernels in C++), then runs the ``on_load`` callbacks of the op
folders (their fake implementations). Each is the "cuda" implementation of an op whose one autograd lives with the
op (``regkern.ops.<op>.op``).

``$REGKERN_CUDA_EXT`` picks the source:
    auto      (default) the prebuilt ``regkern._C`` (``pip install --no-build-isolation -e .``), else a just-in-time
              build with ``torch.utils.cpp_extension.load`` (ninja), cached under ``$REGKERN_CACHE_DIR`` (default
              ``~/.cache/regkern``) per torch/CUDA version and source hash; it takes minutes once.
    prebuilt  the prebuilt module only.
    jit       always the just-in-time build (even when a prebuilt one exists).
    off       never load it (the "cuda" backend then says so).
The just-in-time build respects ``TORCH_CUDA_ARCH_LIST`` (default: the visible GPU's architecture, or
"8.0;9.0" without one), ``MAX_JOBS`` and ``CUDA_HOME``; without ``CUDA_HOME`` it uses the toolkit behind the
``nvcc`` on PATH (also when that is a wrapper script). It compiles the csrc/ sources that the package ships
(``regkern/csrc`` in a wheel) or the checkout's ``csrc/``. Sources, flags and default architectures come from
``regkern.ops.cuda_build``, which ``setup.py`` uses too.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .cuda_build import DEFAULT_ARCHS, EXTENSION_NAME, SOURCES, build_flags, nvcc_wrapper_target, source_dir

__all__ = [
    "ExtensionStatus",
    "load",
    "available",
    "why_unavailable",
    "not_loaded_reasons",
    "require",
    "status",
    "on_load",
    "load_emulator",
    "toolkit_problem",
    "find_toolkit",
    "SOURCES",
    "ENV_VAR",
]

ENV_VAR = "REGKERN_CUDA_EXT"
MODES = ("auto", "prebuilt", "jit", "off")
JIT_NAME = "regkern_C"


@dataclass(frozen=True)
class ExtensionStatus:
    """Whether the extension is loaded, from where, whether its CUDA kernels are compiled in, and why not."""

    loaded: bool
    source: str  # "prebuilt", "jit" or "" when not loaded
    with_cuda: bool
    reason: str  # why it is not loaded (or, when loaded, where from)


_lock = threading.Lock()
_status: Optional[ExtensionStatus] = None
_callbacks: list[Callable[[], None]] = []


def on_load(callback: Callable[[], None]) -> None:
    """Run ``callback()`` once, when the extension's ops are registered (now, if they already are). The op folders
    register their C++ ops' fake implementations this way."""
    _callbacks.append(_once(callback))
    if _status is not None and _status.loaded:
        _callbacks[-1]()


def _once(callback: Callable[[], None]) -> Callable[[], None]:
    done = []

    def run() -> None:
        if not done:
            callback()
            done.append(True)

    return run


def _mode() -> str:
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"${ENV_VAR}: expected one of {MODES}, got {mode!r}")
    return mode


def _jit_build_dir(sources: list[Path], kind: str = "cuda") -> Path:
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.read_bytes())
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "native")
    digest.update(archs.encode())
    root = Path(os.environ.get("REGKERN_CACHE_DIR", Path.home() / ".cache" / "regkern"))
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}".replace("+", "_")
    path = root / "ext" / f"{kind}-{tag}-{digest.hexdigest()[:12]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def toolkit_problem(cuda_home: Optional[str]) -> str:
    """Why ``cuda_home`` is not a usable CUDA toolkit ("" when it is), with the fix in words."""
    if cuda_home is None:
        return "no CUDA toolkit found: set CUDA_HOME to the directory above bin/nvcc"
    if (Path(cuda_home) / "include" / "cuda_runtime.h").exists():
        return ""
    hint = ""
    target = nvcc_wrapper_target()
    if target is not None and (target / "include" / "cuda_runtime.h").exists():
        hint = f" (the nvcc on PATH is a wrapper for {target}: export CUDA_HOME={target})"
    return f"CUDA_HOME={cuda_home} has no include/cuda_runtime.h{hint}"


def _cpp_extension():
    # lazy import of torch's extension builder: slow to import, and needed only to build
    from torch.utils import cpp_extension

    return cpp_extension


def find_toolkit() -> Optional[str]:
    """The CUDA toolkit torch's extension builder will use, made usable when possible: without ``CUDA_HOME`` (or
    ``CUDA_PATH``) in the environment, torch guesses the folder above the ``nvcc`` on PATH, which is wrong when that
    nvcc is a wrapper script; the toolkit behind the wrapper is used instead (and set as torch's ``CUDA_HOME``)."""
    cpp_extension = _cpp_extension()
    current = cpp_extension.CUDA_HOME
    if toolkit_problem(current) and not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        target = nvcc_wrapper_target()
        if target is not None and not toolkit_problem(str(target)):
            cpp_extension.CUDA_HOME = str(target)  # what torch's builder joins bin/nvcc, include/ and lib64/ to
            return str(target)
    return current


def _csrc() -> Path:
    root = source_dir()
    if root is None:
        raise RuntimeError(
            "the csrc/ sources are neither in the installed package (regkern/csrc) nor in a checkout "
            "beside it: reinstall regkern (pip install .) or build the extension ahead of time"
        )
    return root


def _jit_load():
    cpp_extension = _cpp_extension()

    if torch.version.cuda is None:
        raise RuntimeError(f"torch {torch.__version__} is built without CUDA")
    problem = toolkit_problem(find_toolkit())
    if problem:
        raise RuntimeError(problem)
    root = _csrc()
    sources = [root / name for name in SOURCES]
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS  # no GPU to ask: the default architectures
    cxx, nvcc = build_flags()
    return cpp_extension.load(
        name=JIT_NAME,
        sources=[str(p) for p in sources],
        extra_cflags=cxx,
        extra_cuda_cflags=nvcc,
        build_directory=str(_jit_build_dir(sources)),
        verbose=os.environ.get("REGKERN_VERBOSE_BUILD") == "1",
    )


def load(build: bool = True) -> ExtensionStatus:
    """Load the extension once (thread-safe) and return its status; never raises for a missing extension.

    build: allow the just-in-time build when no prebuilt module is found (False: report it missing instead)."""
    global _status
    known = _status
    if known is not None and (known.loaded or not build or known.source == "failed-jit"):
        return known  # the common path: no lock (torch.compile traces through it)
    with _lock:
        if _status is not None and (_status.loaded or not build or _status.source == "failed-jit"):
            return _status
        mode = _mode()
        if mode == "off":
            _status = ExtensionStatus(False, "", False, f"${ENV_VAR}=off")
            return _status
        prebuilt_error = "not tried"
        module, source = None, ""
        if mode in ("auto", "prebuilt"):
            try:
                module, source = importlib.import_module(EXTENSION_NAME), "prebuilt"
            except ImportError as err:
                prebuilt_error = f"no prebuilt regkern._C ({err})"
        if module is None and mode in ("auto", "jit"):
            if not build:
                _status = ExtensionStatus(False, "", False, f"{prebuilt_error}; just-in-time build not attempted")
                return _status
            try:
                module, source = _jit_load(), "jit"
            except Exception as err:  # compiler or toolkit problems: report, never crash the caller
                _status = ExtensionStatus(
                    False, "failed-jit", False, f"{prebuilt_error}; just-in-time build failed: {err}"
                )
                return _status
        if module is None:
            _status = ExtensionStatus(False, "", False, prebuilt_error)
            return _status
        for callback in _callbacks:
            callback()
        with_cuda = bool(getattr(module, "WITH_CUDA", 0))
        built_with = f", toolkit {find_toolkit()}" if source == "jit" else ""
        _status = ExtensionStatus(
            True,
            source,
            with_cuda,
            f"loaded ({source}{built_with}, CUDA kernels "
            f"{'compiled in' if with_cuda else 'absent: CPU implementations only'})",
        )
        return _status


def not_loaded_reasons(device_type: str, build: bool = True) -> list[str]:
    """Why the extension cannot serve a call on ``device_type`` ([] when it can): not loaded, or (for CUDA tensors)
    built without its CUDA kernels. ``build``: allow the just-in-time build (callers pass False when the call is
    refused for other reasons anyway, so no minutes-long build happens for nothing)."""
    s = load(build)
    if not s.loaded:
        return [f"the CUDA extension is not available: {s.reason}"]
    if device_type == "cuda" and not s.with_cuda:
        return ["the CUDA extension was built without its CUDA kernels"]
    return []


def require(device_type: str) -> None:
    """Raise ValueError with the reasons when the extension cannot serve a call on ``device_type``."""
    reasons = not_loaded_reasons(device_type)
    if reasons:
        raise ValueError("impl: 'cuda' cannot run: " + "; ".join(reasons))


def status() -> Optional[ExtensionStatus]:
    """The status found by the last ``load``; None before the first."""
    return _status


def available(build: bool = True) -> bool:
    """True when the extension's ops are registered (loading it, and building it when ``build``, if needed)."""
    return load(build).loaded


def why_unavailable(build: bool = True) -> str:
    """Why the extension is not loaded, in words ("" when it is)."""
    s = load(build)
    return "" if s.loaded else s.reason


def load_emulator(build_directory: Optional[str] = None):
    """Build (host compiler only, ~15 s) and load csrc/emulation/emulated_ops.cpp: the CUDA sources of csrc/ compiled
    for a host emulator of the CUDA features they use (threads per block, barriers, warp shuffles, mma.sync by the
    PTX fragment layout). It registers ``torch.ops.regkern_emulated.cuda_*`` ops that run the very kernels and
    launchers of the CUDA backend on CPU tensors, slowly, so machines without a GPU can execute them (the tests do).
    Needs the CUDA toolkit headers (``CUDA_HOME``) for cuda_fp16.h / cuda_bf16.h and a C++20 compiler."""
    cpp_extension = _cpp_extension()
    toolkit = find_toolkit()
    problem = toolkit_problem(toolkit)
    if problem:
        raise RuntimeError(f"the emulator needs the CUDA toolkit headers: {problem}")
    root = _csrc()
    source = root / "emulation" / "emulated_ops.cpp"
    if not source.exists():
        raise RuntimeError(f"{source} is not here: the emulator needs the csrc/ sources")
    if build_directory is None:
        headers = sorted(root.glob("*.h")) + sorted(root.glob("*.cuh")) + sorted((root / "emulation").glob("*.h"))
        build_directory = str(_jit_build_dir([root / n for n in SOURCES] + headers + [source], kind="emulator"))
    return cpp_extension.load(
        name="regkern_emulated_C",
        sources=[str(source)],
        extra_include_paths=[str(Path(toolkit) / "include")],
        extra_cflags=["-O2", "-std=c++20", "-Wno-unknown-pragmas", "-Wno-attributes"],
        build_directory=build_directory,
        verbose=os.environ.get("REGKERN_VERBOSE_BUILD") == "1",
    )
