"""The measured table behind ``"auto"``'s choice between the "triton" and "cuda" backends, per op and shape.

An entry says: for ``op`` on GPUs of compute capability ``capability``, inputs of ``dtype``, ``dim`` (head dim for
attention, C for layer_norm / embed_tokens) and a sequence length N in ``[min_len, max_len]``, run ``backend``; it
was ``speedup`` times faster than the other backend in the benchmark run named by ``source``. Without a matching
entry the choice is "triton": the CUDA backend is picked only where a GPU run measured it faster.

This module reads tables; the benchmark app writes them (``regkern.apps.dispatch_table_writer``). The shipped table
(``dispatch_table.json`` beside this module) is regenerated on a GPU with
``python -m regkern bench --out DIR --dispatch-table regkern/ops/dispatch_table.json``;
``REGKERN_DISPATCH_TABLE=PATH`` makes every lookup read another file instead.

For embed_tokens there is no Triton kernel: "triton" there stands for the default (non-CUDA) path, the PyTorch
reference, and the benchmark's "regkern-reference" contender is what the "cuda" one is compared with.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional, Union

import torch

__all__ = [
    "OPS",
    "CHOICES",
    "ENV_VAR",
    "DEFAULT_PATH",
    "DispatchEntry",
    "table_path",
    "load_table",
    "clear_cache",
    "choose",
    "entry_description",
    "parse_dtype_name",
    "parse_capability",
    "is_int",
    "VERSION",
]

OPS = ("attention", "layer_norm", "embed_tokens")
#: what an entry may choose; "triton" is also the answer when nothing matches
CHOICES = ("triton", "cuda")
ENV_VAR = "REGKERN_DISPATCH_TABLE"
DEFAULT_PATH = Path(__file__).resolve().with_name("dispatch_table.json")
VERSION = 1


def is_int(value) -> bool:
    """A true int (bool excluded)."""
    return isinstance(value, int) and not isinstance(value, bool)


def parse_dtype_name(value, what: str) -> str:
    """'bfloat16' for torch.bfloat16, 'bfloat16' or 'torch.bfloat16'; ValueError naming ``what`` otherwise."""
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, str):
        dtype = getattr(torch, value.replace("torch.", ""), None)
        if isinstance(dtype, torch.dtype):
            return str(dtype).replace("torch.", "")  # aliases ("half", "float") get their canonical name
    raise ValueError(f"{what}: expected a torch.dtype or its name (e.g. 'bfloat16'), got {value!r}")


def parse_capability(value, what: str) -> tuple[int, int]:
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(is_int(v) and v >= 0 for v in value):
        raise ValueError(f"{what}: expected (major, minor) as two non-negative ints, e.g. (9, 0), got {value!r}")
    return int(value[0]), int(value[1])


def _sm(capability: tuple[int, int]) -> str:
    return f"sm_{capability[0]}{capability[1]}"


def _length_range(min_len: int, max_len: Optional[int]) -> str:
    if min_len == 0 and max_len is None:
        return "any N"
    if min_len == max_len:
        return f"N={min_len}"
    return f"N in [{min_len}, {'inf' if max_len is None else max_len}]"


@dataclass(frozen=True)
class DispatchEntry:
    """One measured choice: ``backend`` for ``op`` on ``capability``/``dtype``/``dim`` and N in [min_len, max_len]."""

    op: str
    capability: tuple[int, int]
    gpu: str
    dtype: str
    dim: int
    min_len: int
    max_len: Optional[int]  # inclusive; None = unbounded
    backend: str
    speedup: float  # time of the other backend / time of the chosen one, same run
    source: str

    def __post_init__(self):
        # frozen: normalised values are written through object.__setattr__
        if self.op not in OPS:
            raise ValueError(f"op: expected one of {list(OPS)}, got {self.op!r}")
        object.__setattr__(self, "capability", parse_capability(self.capability, "capability"))
        if not isinstance(self.gpu, str) or not self.gpu:
            raise ValueError(f"gpu: expected the device name as a non-empty string, got {self.gpu!r}")
        object.__setattr__(self, "dtype", parse_dtype_name(self.dtype, "dtype"))
        if not is_int(self.dim) or self.dim < 1:
            raise ValueError(f"dim: expected a positive int (head dim or C), got {self.dim!r}")
        if not is_int(self.min_len) or self.min_len < 0:
            raise ValueError(f"min_len: expected a non-negative int, got {self.min_len!r}")
        if self.max_len is not None and (not is_int(self.max_len) or self.max_len < self.min_len):
            raise ValueError(f"max_len: expected None or an int >= min_len ({self.min_len}), got {self.max_len!r}")
        if self.backend not in CHOICES:
            raise ValueError(f"backend: expected one of {list(CHOICES)}, got {self.backend!r}")
        if (
            not isinstance(self.speedup, (int, float))
            or isinstance(self.speedup, bool)
            or not (math.isfinite(self.speedup) and self.speedup > 0)
        ):
            raise ValueError(f"speedup: expected a finite positive number, got {self.speedup!r}")
        object.__setattr__(self, "speedup", float(self.speedup))
        if not isinstance(self.source, str):
            raise ValueError(f"source: expected a string, got {self.source!r}")

    @classmethod
    def from_dict(cls, d: dict) -> DispatchEntry:
        """From the JSON form; ValueError naming a missing, unknown or invalid field."""
        if not isinstance(d, dict):
            raise ValueError(f"entry: expected a dict, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise ValueError(f"{missing[0]}: missing (an entry needs {names})")
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown field (an entry has {names})")
        return cls(**{n: d[n] for n in names})

    def to_dict(self) -> dict[str, object]:
        """The JSON form (capability as a list)."""
        d = asdict(self)
        d["capability"] = list(self.capability)
        return d

    def covers(self, seq_len: Optional[int]) -> bool:
        """Whether N = seq_len is in range; seq_len None (any length) only when the range is unbounded."""
        if seq_len is None:
            return self.min_len == 0 and self.max_len is None
        return self.min_len <= seq_len and (self.max_len is None or seq_len <= self.max_len)


# ------------------------------------------------------------------------------------------ reading the table


def table_path() -> Path:
    """The file lookups read: $REGKERN_DISPATCH_TABLE when set, else the packaged dispatch_table.json."""
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_PATH


@functools.cache
def _load(path: str, required: bool) -> tuple[DispatchEntry, ...]:
    p = Path(path)
    if not p.is_file():
        if required:
            raise ValueError(f"{path}: no such dispatch table file")
        return ()  # the packaged file can be missing from a build that skipped package data: no entries
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON dispatch table ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with 'version' and 'entries', got {type(data).__name__}")
    if data.get("version") != VERSION:
        raise ValueError(f"{path}: version: expected {VERSION}, got {data.get('version')!r}")
    raw = data.get("entries")
    if not isinstance(raw, list):
        raise ValueError(f"{path}: entries: expected a list, got {type(raw).__name__}")
    entries = []
    for i, d in enumerate(raw):
        try:
            entries.append(DispatchEntry.from_dict(d))
        except ValueError as err:
            raise ValueError(f"{path}: entries[{i}]: {err}") from None
    return tuple(entries)


def load_table(path: Union[str, os.PathLike, None] = None) -> tuple[DispatchEntry, ...]:
    """The entries of a dispatch table, cached per path (``clear_cache()`` after editing a file).

    Args:
        path: the JSON file; None reads ``table_path()``. A file named here or by $REGKERN_DISPATCH_TABLE must
            exist and be valid, else ValueError naming the path; a missing packaged file reads as empty."""
    required = path is not None or bool(os.environ.get(ENV_VAR))
    return _load(os.path.abspath(table_path() if path is None else path), required)


def clear_cache() -> None:
    """Forget every table read so far (the next lookup reads the files again)."""
    _load.cache_clear()


# ------------------------------------------------------------------------------------------ choosing


def entry_description(entry: DispatchEntry) -> str:
    other = "triton" if entry.backend == "cuda" else "cuda"
    if entry.speedup >= 1.0:
        how = f"{entry.backend} {entry.speedup:.2f}x faster than {other}"
    else:  # kept the default although the other was faster, by less than the margin
        how = f"{entry.backend} kept: {other} only {1 / entry.speedup:.2f}x faster (below the margin)"
    lengths = _length_range(entry.min_len, entry.max_len)
    where = f"{entry.op} {_sm(entry.capability)} {entry.dtype} dim {entry.dim} {lengths}"
    return f"measured: {how} on {entry.gpu} for {where} ({entry.source})"


def choose(
    op: str,
    capability: Optional[Sequence[int]],
    dtype: Union[torch.dtype, str],
    dim: int,
    seq_len: Optional[int] = None,
    table: Union[Sequence[DispatchEntry], str, os.PathLike, None] = None,
) -> tuple[str, str]:
    """(backend, reason in words): "cuda" or "triton" for one op call, from the measured table.

    Args:
        op: "attention", "layer_norm" or "embed_tokens".
        capability: the CUDA device's (major, minor), e.g. (9, 0); None for a non-CUDA device (always "triton").
        dtype: torch.dtype or its name.
        dim: head dim (attention) or C (layer_norm, embed_tokens).
        seq_len: sequence length N; None matches only entries covering every length.
        table: entries, or a table file; None reads ``load_table()``.

    An entry matches on op, capability, dtype, dim and N in its range; of several, the narrowest range wins (the
    first listed on ties). No match -> "triton"."""
    if op not in OPS:
        raise ValueError(f"op: expected one of {list(OPS)}, got {op!r}")
    name = parse_dtype_name(dtype, "dtype")
    if not is_int(dim) or dim < 1:
        raise ValueError(f"dim: expected a positive int, got {dim!r}")
    if seq_len is not None and (not is_int(seq_len) or seq_len < 0):
        raise ValueError(f"seq_len: expected None or a non-negative int, got {seq_len!r}")
    length = "any N" if seq_len is None else f"N={seq_len}"
    if capability is None:
        return "triton", f"not a CUDA device (no compute capability): the cuda backend is not chosen for {op}"
    cap = parse_capability(capability, "capability")
    if table is None or isinstance(table, (str, os.PathLike)):
        where = str(table_path() if table is None else table)
        entries = load_table(table)
    else:
        where = "the given table"
        entries = tuple(table)
        for i, e in enumerate(entries):
            if not isinstance(e, DispatchEntry):
                raise ValueError(f"table: entry {i} is a {type(e).__name__}, expected a DispatchEntry")
    matches = [e for e in entries if (e.op, e.capability, e.dtype, e.dim) == (op, cap, name, dim) and e.covers(seq_len)]
    if not matches:
        return "triton", (
            f"no measured entry for {op} on {_sm(cap)} {name} dim {dim} {length} in {where}; "
            "default triton until GPU numbers exist"
        )

    def width(e: DispatchEntry) -> float:
        return math.inf if e.max_len is None else e.max_len - e.min_len

    best = min(matches, key=width)  # min keeps the first of equal widths
    return best.backend, entry_description(best)
