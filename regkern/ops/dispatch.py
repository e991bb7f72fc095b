"""The one dispatch policy of every op: backends that say what they support, and one ``"auto"``.

Each op family (attention, LayerNorm with norms, token embedding) has a ``Dispatcher`` holding its backends. A
backend declares what it supports (device types, dtypes, features) and answers ``not_supported_reasons(request)``
in words. A request is a frozen dataclass of the static facts of a call (device type, dtype, ``dim``, compute
capability, sequence length, features, and ``describe()`` for messages); it never holds tensors, so a choice can
be made before forward (at module construction or ``.to()``) and is stable under ``torch.compile`` and CUDA-graph
capture.

``Dispatcher.resolve(name, request)``:
    an explicit name (argument, or the dispatcher's environment variable) must support the request, else ValueError
    with the reasons: nothing falls back silently;
    ``"auto"``: on CUDA, the measured table (``regkern.ops.dispatch_table``) may prefer the backend marked
    ``measured`` (the CUDA kernels) for this GPU, dtype, dim and sequence length; otherwise the first backend of
    ``auto_order`` that supports the request and whose ``auto_device_types`` include the request's device.
The returned ``BackendChoice`` says why, in words (``regkern.explain`` prints it).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Optional

import torch

from . import dispatch_table

__all__ = [
    "Backend",
    "BackendChoice",
    "Dispatcher",
    "UnavailableBackend",
    "compile_target",
    "device_capability",
    "multiprocessor_count",
    "dtype_name",
    "kernels_problem",
]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).replace("torch.", "")


#: (compute capability, SM count) that CUDA devices report inside ``compile_target``; None: ask the device
_compile_target: Optional[tuple[tuple[int, int], int]] = None

#: SM counts that ``compile_target`` assumes by default: H100/H200 SXM (sm_90), A100 (sm_80)
_DEFAULT_MULTIPROCESSORS = {90: 132, 80: 108}


@contextlib.contextmanager
def compile_target(arch: int, multiprocessors: Optional[int] = None) -> Iterator[None]:
    """Within the block, CUDA devices report compute capability ``arch`` (e.g. 90) and ``multiprocessors`` SMs
    instead of being asked: how ``regkern bench --static`` gets the launch configurations of an sm_90 or sm_80 GPU
    on a machine without one. Not thread-safe; a developer tool."""
    global _compile_target
    sms = multiprocessors if multiprocessors is not None else _DEFAULT_MULTIPROCESSORS.get(int(arch), 100)
    previous, _compile_target = _compile_target, ((int(arch) // 10, int(arch) % 10), int(sms))
    try:
        yield
    finally:
        _compile_target = previous


def device_capability(device: torch.device) -> Optional[tuple[int, int]]:
    """Compute capability of a CUDA device (queried when a backend is chosen, never at import); None elsewhere."""
    if device.type != "cuda":
        return None
    if _compile_target is not None:
        return _compile_target[0]
    index = torch.cuda.current_device() if device.index is None else device.index
    return cuda_capability(index)


def multiprocessor_count(device: torch.device) -> int:
    """SM count of a CUDA device (queried at launch time, cached per device)."""
    if _compile_target is not None:
        return _compile_target[1]
    index = torch.cuda.current_device() if device.index is None else device.index
    return _cuda_multiprocessors(index)


@functools.cache
def _cuda_multiprocessors(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


@torch.compiler.assume_constant_result  # traced calls (functional ops under torch.compile) see a constant
def cuda_capability(index: int) -> tuple[int, int]:
    """(major, minor) of CUDA device ``index``."""
    major, minor = torch.cuda.get_device_capability(index)
    return int(major), int(minor)


def kernels_problem(load_kernels: Callable[[], ModuleType], device_type: str) -> str:
    """Why an op's Triton kernels (the module ``load_kernels()`` imports) cannot run on ``device_type``, "" when
    they can as far as the device goes: triton missing or broken, or CPU tensors without the interpreter."""
    try:
        module = load_kernels()
    except ImportError as err:  # triton missing or broken
        return f"triton cannot be imported ({err})"
    if device_type == "cpu" and not module.INTERPRETED:
        return "CPU tensors need TRITON_INTERPRET=1 set before regkern's Triton kernels are imported"
    return ""


class Backend:
    """One implementation of an op. Subclasses set the class attributes and refine ``not_supported_reasons``.

    Attributes:
        name: what users pass as ``backend=``.
        description: one line, in words.
        device_types: device types it runs on (CPU under an interpreter or a C++ reference included); None: any
            device PyTorch runs on.
        auto_device_types: device types ``"auto"`` may pick it for (None: all of ``device_types``).
        dtypes: input dtypes it supports; ``device_dtypes`` refines them per device type.
        features: optional features it supports (op-specific names, e.g. statistics, "attn_mask").
        measured: ``"auto"`` picks it only where the measured dispatch table says it is faster.
    """

    name: str = ""
    description: str = ""
    device_types: Optional[tuple[str, ...]] = ("cuda", "cpu")
    auto_device_types: Optional[tuple[str, ...]] = None
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    device_dtypes: Optional[dict[str, tuple[torch.dtype, ...]]] = None
    features: frozenset[str] = frozenset()
    measured: bool = False

    def runs_on(self, device_type: str) -> bool:
        """Whether this backend runs on ``device_type`` at all."""
        return self.device_types is None or device_type in self.device_types

    def supported_dtypes(self, device_type: str) -> tuple[torch.dtype, ...]:
        """The input dtypes this backend runs on ``device_type``."""
        return (self.device_dtypes or {}).get(device_type, self.dtypes)

    def not_supported_reasons(self, request) -> list[str]:
        """Reasons, in words, why this backend cannot serve ``request``; empty when it can. The base class checks
        the declared device types, dtypes and ``request.features``."""
        reasons = []
        if self.device_types is not None and request.device_type not in self.device_types:
            reasons.append(f"device type {request.device_type!r} is not supported ({', '.join(self.device_types)})")
        dtypes = self.supported_dtypes(request.device_type)
        if request.dtype not in dtypes:
            names = ", ".join(dtype_name(d) for d in dtypes)
            reasons.append(f"dtype {dtype_name(request.dtype)} is not supported ({names})")
        missing = sorted(set(request.features) - set(self.features))
        if missing:
            reasons.append(f"{', '.join(missing)} not supported by the {self.name} backend")
        return reasons

    def __repr__(self) -> str:
        return f"<regkern backend {self.name!r}: {self.description}>"


class UnavailableBackend(Backend):
    """Stands in for an explicitly requested backend that cannot run on a module's current device or dtype.

    The module can still be built (e.g. on the CPU before ``.cuda()``); calling it raises the reasons."""

    def __init__(self, name: str, message: str):
        self.name = f"{name} (unavailable)"
        self.description = "unavailable: " + message
        self.message = message

    def not_supported_reasons(self, request) -> list[str]:
        return [self.message]

    def attention(self, *args, **kwargs):
        raise RuntimeError(self.message)


@dataclass(frozen=True)
class BackendChoice:
    """A resolved backend and, in words, why it was chosen (and why the ones before it were not)."""

    backend: Backend
    reason: str
    skipped: dict[str, list[str]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def available(self) -> bool:
        return not isinstance(self.backend, UnavailableBackend)


class Dispatcher:
    """The backends of one op and the one ``"auto"`` policy over them.

    Args:
        op: the op's name in the measured dispatch table ("attention", "layer_norm", "embed_tokens").
        label: the op in messages ("LayerNorm", ...; "" for the attention op, the library's default op).
        backends: the backends, any order.
        auto_order: names ``"auto"`` tries in order after the measured table's word.
        env_var: environment variable that names a backend when the argument is None (None: no variable).
        refusal: the error when a named backend cannot run, formatted with name, source (argument or environment
            variable), what (``request.describe()``) and reasons.
    """

    def __init__(
        self,
        op: str,
        label: str,
        backends: Sequence[Backend],
        auto_order: Sequence[str],
        env_var: Optional[str] = None,
        refusal: str = "backend {name!r} (from {source}) cannot run {what}: {reasons}",
    ):
        self.op = op
        self.label = label
        self.refusal = refusal
        self.backends: dict[str, Backend] = {b.name: b for b in backends}
        self.auto_order = tuple(auto_order)
        unknown = [n for n in self.auto_order if n not in self.backends]
        if unknown:
            raise ValueError(f"auto_order: unknown backends {unknown}")
        self.env_var = env_var

    @property
    def names(self) -> tuple[str, ...]:
        """Every name ``backend=`` accepts, "auto" first."""
        return ("auto", *self.backends)

    def get(self, name: str) -> Backend:
        """The backend registered under ``name``; ValueError naming the known ones otherwise."""
        try:
            return self.backends[name]
        except KeyError:
            raise ValueError(
                f"backend: unknown {self.label + ' ' if self.label else ''}backend {name!r}; expected "
                f"one of {list(self.names)}"
            ) from None

    def requested_name(self, backend: Optional[str]) -> tuple[str, str]:
        """The backend name to use and where it came from: the argument, else the environment variable, else
        "auto". TypeError naming ``backend`` for a non-string."""
        if backend is not None:
            if not isinstance(backend, str):
                raise TypeError(
                    f"backend: expected a string in {list(self.names)} or None, got {type(backend).__name__}"
                )
            return backend, "backend argument"
        env = os.environ.get(self.env_var, "").strip() if self.env_var else ""
        if env:
            return env, f"${self.env_var}"
        return "auto", "default"

    def check_name(self, backend: Optional[str]) -> str:
        """The requested name ("auto" for None); TypeError / ValueError naming ``backend`` for anything unknown."""
        name, source = self.requested_name(backend)
        if name != "auto":
            try:
                self.get(name)
            except ValueError as err:
                if source.startswith("$"):  # name the environment variable the bad name came from
                    raise ValueError(f"{source[1:]}: {str(err).split(': ', 1)[1]}") from None
                raise
        return name

    def resolve(self, backend: Optional[str], request) -> BackendChoice:
        """Choose the backend for ``request`` once (see the module docstring)."""
        name, source = self.requested_name(backend)
        if name != "auto":
            chosen = self.get(name)
            reasons = chosen.not_supported_reasons(request)
            if reasons:
                raise ValueError(
                    self.refusal.format(name=name, source=source, what=request.describe(), reasons="; ".join(reasons))
                )
            return BackendChoice(chosen, f"requested by {source}")
        skipped: dict[str, list[str]] = {}
        measured = [b for b in self.backends.values() if b.measured]
        if request.device_type == "cuda" and request.capability is not None:
            for candidate in measured:
                preferred, why = dispatch_table.choose(
                    self.op, request.capability, request.dtype, request.dim, request.seq_len
                )
                if preferred != candidate.name:
                    skipped[candidate.name] = [why]
                    continue
                reasons = candidate.not_supported_reasons(request)
                if not reasons:
                    return BackendChoice(candidate, f"auto ({source}): {why}")
                skipped[candidate.name] = [why] + reasons
        for candidate_name in self.auto_order:
            candidate = self.backends[candidate_name]
            allowed = candidate.auto_device_types
            if allowed is not None and request.device_type not in allowed:
                skipped[candidate_name] = [f"auto uses it on {'/'.join(allowed)} only (name it explicitly otherwise)"]
                continue
            reasons = candidate.not_supported_reasons(request)
            if not reasons:
                why = f"auto ({source}): first supporting backend for {request.device_type}/{dtype_name(request.dtype)}"
                if skipped:
                    why += "; skipped " + "; ".join(f"{n}: {', '.join(r)}" for n, r in skipped.items())
                return BackendChoice(candidate, why, skipped)
            skipped[candidate_name] = reasons
        raise ValueError(f"backend 'auto': no backend supports {request.describe()}: {skipped}")

    def resolve_or_unavailable(self, backend: Optional[str], request) -> BackendChoice:
        """``resolve``, but an explicitly named backend that cannot run becomes an ``UnavailableBackend`` (for
        modules, which may be built before they move to the device their backend needs)."""
        try:
            return self.resolve(backend, request)
        except ValueError as err:
            name = backend or "auto"
            return BackendChoice(UnavailableBackend(name, str(err)), f"unavailable: {err}")
