"""``regkern env``: the facts a bug report needs, as text to paste (or ``--json``).

Versions (Python, torch and its CUDA build, triton, timm, numpy, regkern), the CUDA toolkit (nvcc and where it was
found), the GPUs, the CUDA extension ``regkern._C`` (prebuilt / buildable just in time / loaded), the attention
backend ``"auto"`` picks for a ViT-B/14-reg4 call and why, and the environment variables that steer regkern. It
never builds the extension (that takes minutes); loading a prebuilt one is quick and is done.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from ..ops import cuda_build, cuda_ext, dispatch_table
from ..ops.attention import DISPATCHER, AttentionRequest
from ..ops.dispatch import Dispatcher, device_capability, dtype_name
from ..version import __version__

__all__ = ["add_env_arguments", "run_env", "collect_env", "format_env", "attention_choice", "PACKAGES"]

#: the Python packages whose versions a report lists (import name); missing ones read "not installed"
PACKAGES = ("torch", "triton", "timm", "numpy")
#: what a ViT-B/14 with 4 registers at 224 px runs: 1 CLS + 4 registers + 16 x 16 patches, 12 heads of 64
VIT_B14_REG4 = {"B": 1, "N": 261, "H": 12, "d": 64}
#: environment variables besides REGKERN_* that change what regkern finds, builds or runs
OTHER_VARIABLES = ("TRITON_INTERPRET", "CUDA_HOME", "CUDA_PATH", "CUDA_VISIBLE_DEVICES", "TORCH_CUDA_ARCH_LIST")
NOT_INSTALLED = "not installed"


def add_env_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the same facts as one JSON object")


def _package_version(name: str) -> str:
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError:
        return NOT_INSTALLED
    except Exception as err:  # installed but broken: that is what the report must say
        return f"cannot be imported: {type(err).__name__}: {err}"
    return str(getattr(module, "__version__", "unknown version"))


def _versions() -> dict[str, object]:
    return {
        "python": f"{platform.python_version()} ({platform.python_implementation()}, {sys.executable})",
        "platform": platform.platform(),
        "regkern": f"{__version__} ({Path(__file__).resolve().parents[1]})",
        **{name: _package_version(name) for name in PACKAGES},
        "torch_cuda": torch.version.cuda,  # None: a CPU-only build of torch
    }


def _run_version(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        return f"cannot run {command[0]}: {err}"
    text = done.stdout + done.stderr
    found = re.search(r"release [\d.]+, V([\d.]+)", text)
    if found:
        return found.group(1)
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"{command[0]} printed nothing (exit code {done.returncode})"


def _toolkit() -> dict[str, object]:
    # importing torch's extension builder logs its own guess of the toolkit on machines without a GPU ("No CUDA
    # runtime is found, using CUDA_HOME=..."), which find_toolkit may correct: the report states the outcome instead
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        # lazy import of torch.utils.cpp_extension: slow, and only this section needs it
        from torch.utils import cpp_extension

        torch_guess = cpp_extension.CUDA_HOME
        home = cuda_ext.find_toolkit()
    finally:
        logger.setLevel(level)
    on_path = shutil.which("nvcc")
    wrapper_target = cuda_build.nvcc_wrapper_target()
    if os.environ.get("CUDA_HOME"):
        found = "$CUDA_HOME"
    elif os.environ.get("CUDA_PATH"):
        found = "$CUDA_PATH"
    elif home is not None and wrapper_target is not None and Path(home) == wrapper_target:
        found = f"behind the nvcc on PATH, {on_path} (a wrapper script or link)"
    elif home is not None and on_path is not None and Path(on_path).parent.parent == Path(home):
        found = f"above the nvcc on PATH, {on_path}"
    elif home is not None:
        found = "torch's default location"
    else:
        found = "not found"
    nvcc = None
    if home is not None and (Path(home) / "bin" / "nvcc").is_file():
        nvcc = str(Path(home) / "bin" / "nvcc")
    elif on_path is not None:
        nvcc = on_path
    return {
        "path": home,
        "found": found,
        "torch_guess": torch_guess,
        "nvcc": nvcc,
        "nvcc_on_path": on_path,
        "nvcc_version": _run_version([nvcc, "--version"]) if nvcc else None,
        "problem": cuda_ext.toolkit_problem(home),
    }


def _gpus() -> list[dict[str, object]]:
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append(
            {
                "index": index,
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
                "multiprocessors": props.multi_processor_count,
            }
        )
    return gpus


def _driver() -> Optional[str]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    return _run_version([smi, "--query-gpu=driver_version", "--format=csv,noheader"]).splitlines()[0]


def _jit_problems(mode: str, toolkit_problem: str) -> list[str]:
    """Why a just-in-time build of the extension cannot happen ([] when it can)."""
    # lazy import of torch.utils.cpp_extension: slow, and only the build facts need it
    from torch.utils import cpp_extension

    problems = []
    if mode not in ("auto", "jit"):
        problems.append(f"${cuda_ext.ENV_VAR}={mode} does not allow it")
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is built without CUDA")
    if toolkit_problem:
        problems.append(toolkit_problem)
    if cuda_build.source_dir() is None:
        problems.append("the csrc/ sources are neither in the package nor in a checkout beside it")
    if not cpp_extension.is_ninja_available():
        problems.append("ninja is not installed (pip install ninja)")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        problems.append(f"no C++ compiler {compiler!r} on PATH")
    return problems


def _extension(toolkit_problem: str) -> dict[str, object]:
    mode = os.environ.get(cuda_ext.ENV_VAR, "auto").strip().lower() or "auto"
    try:
        spec = importlib.util.find_spec(cuda_build.EXTENSION_NAME)
    except (ImportError, ValueError):  # ValueError: sys.modules holds None for it
        spec = None
    jit = _jit_problems(mode, toolkit_problem)
    try:
        status = cuda_ext.load(build=False)  # a prebuilt module loads in a moment; a build would take minutes
        loaded = {"loaded": status.loaded, "source": status.source, "with_cuda": status.with_cuda}
        reason = status.reason
    except ValueError as err:  # a misspelt $REGKERN_CUDA_EXT
        loaded, reason = {"loaded": False, "source": "", "with_cuda": False}, str(err)
    return {
        "mode": mode,
        "prebuilt": spec.origin if spec is not None else None,
        "jit_possible": not jit,
        "jit_problems": jit,
        **loaded,
        "reason": reason,
    }


def attention_choice(device: torch.device, dtype: torch.dtype, seq_len: int, head_dim: int) -> dict[str, str]:
    """The attention backend patched models get for one call shape (``$REGKERN_BACKEND`` or ``"auto"``) and why.

    Never builds the CUDA extension: when it is not loaded, the choice is made among the other backends and a note
    says what the measured table would prefer once a run has built it."""
    capability = device_capability(device)
    request = AttentionRequest(device.type, dtype, head_dim, capability=capability, seq_len=seq_len)
    requested, source = DISPATCHER.requested_name(None)
    answer = {"requested": f"{requested} ({source})"}
    if cuda_ext.load(build=False).loaded:
        choice = DISPATCHER.resolve_or_unavailable(None, request)
        return {**answer, "backend": choice.name, "reason": choice.reason}
    # the cuda backend would build the extension (minutes) to answer: ask the others, say what the table prefers
    preferred, why = dispatch_table.choose(DISPATCHER.op, capability, dtype, head_dim, seq_len)
    not_built = "the CUDA extension is not loaded: a run first builds it just in time (minutes; regkern env does not)"
    if requested == "cuda":
        return {**answer, "backend": "cuda, once built", "reason": f"requested by {source}; {not_built}, else fails"}
    if requested == "auto" and preferred == "cuda":
        return {**answer, "backend": "cuda, once built", "reason": f"{why}; {not_built}, else uses triton"}
    others = [backend for name, backend in DISPATCHER.backends.items() if name != "cuda"]
    order = [name for name in DISPATCHER.auto_order if name != "cuda"]
    dispatcher = Dispatcher(
        DISPATCHER.op, DISPATCHER.label, others, order, env_var=DISPATCHER.env_var, refusal=DISPATCHER.refusal
    )
    choice = dispatcher.resolve_or_unavailable(None, request)
    reason = choice.reason
    if requested == "auto" and device.type == "cuda":
        reason += f"; skipped cuda: {why}"  # what the full dispatcher says before it tries the extension
    return {**answer, "backend": choice.name, "reason": reason}


def _attention() -> dict[str, object]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = VIT_B14_REG4
    call = (
        f"ViT-B/14-reg4 call (B={shape['B']}, N={shape['N']}, H={shape['H']}, d={shape['d']}, "
        f"{dtype_name(dtype)} on {device.type})"
    )
    try:
        choice = attention_choice(device, dtype, shape["N"], shape["d"])
    except (TypeError, ValueError) as err:  # e.g. a misspelt $REGKERN_BACKEND
        choice = {"requested": "", "backend": "none", "reason": str(err)}
    return {"call": call, **choice}


def _environment() -> dict[str, str]:
    names = sorted(n for n in os.environ if n.startswith("REGKERN_")) + [n for n in OTHER_VARIABLES if n in os.environ]
    return {name: os.environ[name] for name in names}


def collect_env() -> dict[str, object]:
    """Everything ``regkern env`` reports, as a JSON-ready dict."""
    toolkit = _toolkit()
    return {
        "versions": _versions(),
        "cuda_toolkit": toolkit,
        "gpus": _gpus(),
        "driver": _driver(),
        "cuda_extension": _extension(str(toolkit["problem"])),
        "attention": _attention(),
        "environment": _environment(),
    }


def format_env(info: dict[str, object]) -> str:
    """The text of ``regkern env`` from ``collect_env()``'s dict."""
    v, tk, ext, att = info["versions"], info["cuda_toolkit"], info["cuda_extension"], info["attention"]
    torch_build = f"CUDA build {v['torch_cuda']}" if v["torch_cuda"] else "CPU-only build"
    lines = ["regkern env (paste this into a bug report)", "", "versions"]
    lines += [f"  {'python':<14}{v['python']}", f"  {'platform':<14}{v['platform']}"]
    lines += [f"  {'regkern':<14}{v['regkern']}", f"  {'torch':<14}{v['torch']} ({torch_build})"]
    lines += [f"  {name:<14}{v[name]}" for name in PACKAGES if name != "torch"]
    lines += ["", "CUDA toolkit"]
    lines.append(f"  {'path':<14}{tk['path'] or 'none'}")
    lines.append(f"  {'found':<14}{tk['found']}")
    if tk["torch_guess"] != tk["path"]:
        lines.append(f"  {'torch guessed':<14}{tk['torch_guess']} (corrected: see 'path')")
    lines.append(f"  {'nvcc':<14}{tk['nvcc_version'] or 'none'}" + (f" ({tk['nvcc']})" if tk["nvcc"] else ""))
    lines.append(f"  {'problem':<14}{tk['problem'] or 'none'}")
    lines += ["", "GPU"]
    if info["gpus"]:
        for gpu in info["gpus"]:
            lines.append(
                f"  cuda:{gpu['index']:<9}{gpu['name']}, compute capability {gpu['capability']}, "
                f"{gpu['memory_gib']} GiB, {gpu['multiprocessors']} SMs"
            )
    else:
        lines.append("  none (torch.cuda.is_available() is False)")
    if info["driver"]:
        lines.append(f"  {'driver':<14}{info['driver']}")
    lines += ["", f"CUDA extension regkern._C (${cuda_ext.ENV_VAR}={ext['mode']})"]
    lines.append(f"  {'prebuilt':<14}" + (f"yes ({ext['prebuilt']})" if ext["prebuilt"] else "no"))
    jit = "possible (minutes, once; cached)"
    if not ext["jit_possible"]:
        jit = "not possible: " + "; ".join(ext["jit_problems"])
    lines.append(f"  {'just in time':<14}{jit}")
    lines.append(f"  {'loaded':<14}{ext['reason'] if ext['loaded'] else 'no: ' + ext['reason']}")
    lines += ["", f"attention backend for a {att['call']}"]
    lines.append(f"  {'requested':<14}{att['requested']}")
    lines.append(f"  {'backend':<14}{att['backend']}")
    lines.append(f"  {'why':<14}{att['reason']}")
    lines += ["", "environment"]
    variables = [f"  {name}={value}" for name, value in info["environment"].items()]
    lines += variables or ["  (none of REGKERN_*, " + ", ".join(OTHER_VARIABLES) + " is set)"]
    return "\n".join(lines)


def run_env(args: argparse.Namespace, out: Callable[[str], None] = print) -> dict[str, object]:
    """Print the report (text, or JSON with ``--json``); returns it as a dict."""
    info = collect_env()
    out(json.dumps(info, indent=1) if args.json else format_env(info))
    return info
