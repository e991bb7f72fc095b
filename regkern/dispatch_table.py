"""The measured table behind ``"auto"``'s choice between the "triton" and "cuda" backends, per op and shape.

An entry says: for ``op`` on GPUs of compute capability ``capability``, inputs of ``dtype``, ``dim`` (head dim for
attention, C for layer_norm / embed_tokens) and a sequence length N in ``[min_len, max_len]``, run ``backend``; it
was ``speedup`` times faster than the other backend in the benchmark run named by ``source``. Without a matching
entry the choice is "triton": the CUDA backend is picked only where a GPU run measured it faster.

The shipped table (``dispatch_table.json`` beside this module) is regenerated on a GPU with
``python -m regkern bench --out DIR --dispatch-table regkern/dispatch_table.json``; ``REGKERN_DISPATCH_TABLE=PATH``
makes every lookup read another file instead.

For embed_tokens there is no Triton kernel: "triton" there stands for the default (non-CUDA) path, the PyTorch
reference, and the benchmark's "regkern-reference" contender is what the "cuda" one is compared with.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

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
    "entries_from_bench",
    "write_table",
]

OPS = ("attention", "layer_norm", "embed_tokens")
#: what an entry may choose; "triton" is also the answer when nothing matches
CHOICES = ("triton", "cuda")
ENV_VAR = "REGKERN_DISPATCH_TABLE"
DEFAULT_PATH = Path(__file__).resolve().with_name("dispatch_table.json")
VERSION = 1
COMMENT = ("Measured triton-vs-cuda choices of backend='auto' (regkern.dispatch_table); no matching entry means "
           "triton. Regenerate on a GPU: python -m regkern bench --out DIR --dispatch-table "
           "regkern/dispatch_table.json")

#: benchmark contenders compared per op: (the default's contender, the CUDA backend's contender); the attention
#: variants with KV registers or statistics are reported by ``regkern bench`` but not used for dispatch
_BENCH_PAIRS = {
    "attention": ("regkern-triton", "regkern-cuda"),
    "layer_norm": ("regkern-triton", "regkern-cuda"),
    "embed_tokens": ("regkern-reference", "regkern-cuda"),  # no Triton kernel: the default path is PyTorch
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dtype_name(value, what: str) -> str:
    """'bfloat16' for torch.bfloat16, 'bfloat16' or 'torch.bfloat16'; ValueError naming ``what`` otherwise."""
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, str):
        dtype = getattr(torch, value.replace("torch.", ""), None)
        if isinstance(dtype, torch.dtype):
            return str(dtype).replace("torch.", "")  # aliases ("half", "float") get their canonical name
    raise ValueError(f"{what}: expected a torch.dtype or its name (e.g. 'bfloat16'), got {value!r}")


def _capability(value, what: str) -> Tuple[int, int]:
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(_is_int(v) and v >= 0 for v in value):
        raise ValueError(f"{what}: expected (major, minor) as two non-negative ints, e.g. (9, 0), got {value!r}")
    return int(value[0]), int(value[1])


def _sm(capability: Tuple[int, int]) -> str:
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
    capability: Tuple[int, int]
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
        object.__setattr__(self, "capability", _capability(self.capability, "capability"))
        if not isinstance(self.gpu, str) or not self.gpu:
            raise ValueError(f"gpu: expected the device name as a non-empty string, got {self.gpu!r}")
        object.__setattr__(self, "dtype", _dtype_name(self.dtype, "dtype"))
        if not _is_int(self.dim) or self.dim < 1:
            raise ValueError(f"dim: expected a positive int (head dim or C), got {self.dim!r}")
        if not _is_int(self.min_len) or self.min_len < 0:
            raise ValueError(f"min_len: expected a non-negative int, got {self.min_len!r}")
        if self.max_len is not None and (not _is_int(self.max_len) or self.max_len < self.min_len):
            raise ValueError(f"max_len: expected None or an int >= min_len ({self.min_len}), got {self.max_len!r}")
        if self.backend not in CHOICES:
            raise ValueError(f"backend: expected one of {list(CHOICES)}, got {self.backend!r}")
        if not isinstance(self.speedup, (int, float)) or isinstance(self.speedup, bool) or not (
                math.isfinite(self.speedup) and self.speedup > 0):
            raise ValueError(f"speedup: expected a finite positive number, got {self.speedup!r}")
        object.__setattr__(self, "speedup", float(self.speedup))
        if not isinstance(self.source, str):
            raise ValueError(f"source: expected a string, got {self.source!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "DispatchEntry":
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

    def to_dict(self) -> Dict[str, object]:
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


@functools.lru_cache(maxsize=None)
def _load(path: str, required: bool) -> Tuple[DispatchEntry, ...]:
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


def load_table(path: Union[str, os.PathLike, None] = None) -> Tuple[DispatchEntry, ...]:
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


def _describe(entry: DispatchEntry) -> str:
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
) -> Tuple[str, str]:
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
    name = _dtype_name(dtype, "dtype")
    if not _is_int(dim) or dim < 1:
        raise ValueError(f"dim: expected a positive int, got {dim!r}")
    if seq_len is not None and (not _is_int(seq_len) or seq_len < 0):
        raise ValueError(f"seq_len: expected None or a non-negative int, got {seq_len!r}")
    length = "any N" if seq_len is None else f"N={seq_len}"
    if capability is None:
        return "triton", f"not a CUDA device (no compute capability): the cuda backend is not chosen for {op}"
    cap = _capability(capability, "capability")
    if table is None or isinstance(table, (str, os.PathLike)):
        where = str(table_path() if table is None else table)
        entries = load_table(table)
    else:
        where = "the given table"
        entries = tuple(table)
        for i, e in enumerate(entries):
            if not isinstance(e, DispatchEntry):
                raise ValueError(f"table: entry {i} is a {type(e).__name__}, expected a DispatchEntry")
    matches = [e for e in entries
               if (e.op, e.capability, e.dtype, e.dim) == (op, cap, name, dim) and e.covers(seq_len)]
    if not matches:
        return "triton", (f"no measured entry for {op} on {_sm(cap)} {name} dim {dim} {length} in {where}; "
                          "default triton until GPU numbers exist")

    def width(e: DispatchEntry) -> float:
        return math.inf if e.max_len is None else e.max_len - e.min_len

    best = min(matches, key=width)  # min keeps the first of equal widths
    return best.backend, _describe(best)


# ------------------------------------------------------------------------------------------ writing


def _bench_cases(results: dict) -> List[dict]:
    from .bench import _cases  # the bench module's reading of pytest-benchmark JSON

    if not isinstance(results, dict) or not isinstance(results.get("benchmarks"), list):
        raise ValueError("results: expected pytest-benchmark JSON (a dict with a 'benchmarks' list)")
    return _cases(results)


def _case_op(case: dict) -> Optional[str]:
    # attention cases recorded before "op" existed are recognised by their head dim
    return case.get("op", "attention" if "d" in case and "contender" in case else None)


def entries_from_bench(results: dict, margin: float = 1.03, source: Optional[str] = None) -> List[DispatchEntry]:
    """Dispatch entries from one benchmark run (``python -m regkern bench``'s results.json).

    For every op, GPU, dtype, dim and N measured in forward mode by both the default's contender and the CUDA
    backend's (``regkern-triton`` and ``regkern-cuda``; ``regkern-reference`` for embed_tokens), one entry for
    exactly that N (for layer_norm, whose modules choose without knowing N: one entry for every length, pooled): "cuda"
    when it is at least ``margin`` times faster, else "triton". Shapes sharing a key (e.g.
    two batch sizes at the same N) are pooled: the ratio of their summed median times.

    Args:
        results: pytest-benchmark JSON as a dict.
        margin: how much faster cuda must be to be chosen (>= 1; noise should not flip the default).
        source: named in each entry (e.g. the results file); the run's date and commit are added."""
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not margin >= 1.0:
        raise ValueError(f"margin: expected a number >= 1.0, got {margin!r}")
    cases = _bench_cases(results)
    # (op, shape id) -> {contender: case}, forward only: the table serves inference dispatch
    runs: Dict[Tuple[str, str], Dict[str, dict]] = {}
    for c in cases:
        op = _case_op(c)
        if op in _BENCH_PAIRS and c.get("mode") == "fwd" and c.get("median_s") is not None:
            runs.setdefault((op, c.get("shape")), {})[c["contender"]] = c
    pooled: Dict[tuple, dict] = {}
    for (op, shape), by_name in sorted(runs.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        default_name, cuda_name = _BENCH_PAIRS[op]
        base, cuda = by_name.get(default_name), by_name.get(cuda_name)
        if base is None or cuda is None:
            continue
        if cuda.get("capability") is None:
            raise ValueError(f"results: case {cuda.get('name')!r} records no 'capability' (benchmarks older than "
                             "the dispatch table; re-run the suite)")
        dim = cuda.get("d") if op == "attention" else cuda.get("C")
        try:
            if not _is_int(dim) or not _is_int(cuda.get("N")):
                raise ValueError(f"{'d' if op == 'attention' else 'C'}, N: expected ints, got {dim!r}, "
                                 f"{cuda.get('N')!r}")
            # LayerNorm modules choose once, without knowing N: their entries cover every length (pooled over N)
            length = None if op == "layer_norm" else cuda["N"]
            key = (op, _capability(cuda["capability"], "capability"), _dtype_name(cuda.get("dtype"), "dtype"), dim,
                   length)
        except ValueError as err:
            raise ValueError(f"results: case {cuda.get('name')!r}: {err}") from None
        slot = pooled.setdefault(key, {"gpu": cuda.get("device"), "base_s": 0.0, "cuda_s": 0.0, "shapes": [],
                                       "names": (default_name, cuda_name)})
        slot["base_s"] += base["median_s"]
        slot["cuda_s"] += cuda["median_s"]
        slot["shapes"].append(str(shape))
    commit = next((c.get("commit") for c in cases if c.get("commit")), None)
    run = ", ".join(str(x) for x in (source or "regkern bench run", results.get("datetime"),
                                     commit and f"commit {commit}") if x)
    entries = []
    for (op, cap, dtype, dim, n), slot in sorted(pooled.items(), key=lambda kv: (*kv[0][:4], kv[0][4] or 0)):
        ratio = slot["base_s"] / slot["cuda_s"]  # > 1: cuda faster
        backend = "cuda" if ratio >= margin else "triton"
        default_name, cuda_name = slot["names"]
        source_text = (f"{run}: {cuda_name} {1e6 * slot['cuda_s']:.1f} us vs {default_name} "
                       f"{1e6 * slot['base_s']:.1f} us, fwd median, {'+'.join(slot['shapes'])}")
        entries.append(DispatchEntry(op=op, capability=cap, gpu=slot["gpu"] or "unknown GPU", dtype=dtype, dim=dim,
                                     min_len=n or 0, max_len=n, backend=backend,
                                     speedup=ratio if backend == "cuda" else 1 / ratio, source=source_text))
    return entries


def write_table(entries: Sequence[DispatchEntry], path: Union[str, os.PathLike]) -> Path:
    """Write ``entries`` as a version-1 table to ``path`` (parents created) and forget cached tables."""
    entries = list(entries)
    for i, e in enumerate(entries):
        if not isinstance(e, DispatchEntry):
            raise ValueError(f"entries: entry {i} is a {type(e).__name__}, expected a DispatchEntry")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = {"version": VERSION, "comment": COMMENT, "entries": [e.to_dict() for e in entries]}
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(p)  # a lookup never sees a half-written table
    clear_cache()
    return p
