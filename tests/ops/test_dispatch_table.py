"""The measured triton-vs-cuda dispatch table: entries, lookup rules, files (writing them: tests/apps)."""

import json

import pytest
import torch

from regkern.apps.dispatch_table_writer import write_table
from regkern.ops import dispatch_table as dt
from regkern.ops.dispatch_table import DispatchEntry, choose, load_table

H100 = "NVIDIA H100 80GB HBM3"


def entry(**overrides) -> DispatchEntry:
    d = dict(
        op="attention",
        capability=(9, 0),
        gpu=H100,
        dtype="bfloat16",
        dim=64,
        min_len=0,
        max_len=512,
        backend="cuda",
        speedup=1.12,
        source="bench-results/results.json",
    )
    d.update(overrides)
    return DispatchEntry(**d)


@pytest.fixture(autouse=True)
def _fresh_tables(monkeypatch):
    # each test reads its own files: no developer $REGKERN_DISPATCH_TABLE, no table cached by another test
    monkeypatch.delenv(dt.ENV_VAR, raising=False)
    dt.clear_cache()
    yield
    dt.clear_cache()


def test_packaged_table_is_valid_and_empty():
    data = json.loads(dt.DEFAULT_PATH.read_text())
    assert data["version"] == 1 and data["entries"] == [] and "--dispatch-table" in data["comment"]
    assert load_table() == () and load_table(dt.DEFAULT_PATH) == ()
    assert dt.table_path() == dt.DEFAULT_PATH


def test_entry_round_trip_and_normalisation():
    e = entry(capability=[8, 6], dtype=torch.float16, speedup=2)
    assert e.capability == (8, 6) and e.dtype == "float16" and e.speedup == 2.0 and isinstance(e.speedup, float)
    d = e.to_dict()
    assert d["capability"] == [8, 6] and json.loads(json.dumps(d)) == d
    assert DispatchEntry.from_dict(d) == e
    assert entry(dtype="torch.half").dtype == "float16"  # aliases get the canonical name


@pytest.mark.parametrize(
    "field, value",
    [
        ("op", "softmax"),
        ("capability", (9,)),
        ("capability", "9.0"),
        ("capability", (9, -1)),
        ("gpu", ""),
        ("dtype", "bf16"),
        ("dim", 0),
        ("dim", 64.0),
        ("min_len", -1),
        ("max_len", -5),
        ("backend", "torch"),
        ("speedup", 0.0),
        ("speedup", float("nan")),
        ("speedup", True),
        ("source", None),
    ],
)
def test_entry_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        entry(**{field: value})


def test_from_dict_missing_and_unknown_fields():
    d = entry().to_dict()
    with pytest.raises(ValueError, match="^speedup: missing"):
        DispatchEntry.from_dict({k: v for k, v in d.items() if k != "speedup"})
    with pytest.raises(ValueError, match="^head_dim: unknown field"):
        DispatchEntry.from_dict(dict(d, head_dim=64))
    with pytest.raises(ValueError, match="^entry: expected a dict"):
        DispatchEntry.from_dict([d])


def test_choose_without_entries_defaults_to_triton():
    backend, reason = choose("attention", (9, 0), torch.bfloat16, 64, 261, table=[])
    assert backend == "triton"
    assert reason == (
        "no measured entry for attention on sm_90 bfloat16 dim 64 N=261 in the given table; "
        "default triton until GPU numbers exist"
    )
    backend, reason = choose("layer_norm", (9, 0), "bfloat16", 768)
    assert backend == "triton" and f"any N in {dt.DEFAULT_PATH}" in reason


def test_choose_not_a_cuda_device():
    backend, reason = choose("attention", None, torch.float32, 64, 261, table=[entry(dtype="float32")])
    assert backend == "triton" and "not a CUDA device" in reason


def test_choose_matching_rules():
    table = [entry(min_len=0, max_len=512)]
    backend, reason = choose("attention", (9, 0), torch.bfloat16, 64, 261, table=table)
    assert backend == "cuda"
    assert reason == (
        "measured: cuda 1.12x faster than triton on NVIDIA H100 80GB HBM3 for attention sm_90 bfloat16 "
        "dim 64 N in [0, 512] (bench-results/results.json)"
    )
    assert choose("attention", [9, 0], "torch.bfloat16", 64, 512, table=table)[0] == "cuda"  # inclusive bound
    for miss in [
        dict(seq_len=513),
        dict(capability=(8, 0)),
        dict(dtype=torch.float16),
        dict(dim=128),
        dict(op="layer_norm"),
    ]:
        args = dict(op="attention", capability=(9, 0), dtype=torch.bfloat16, dim=64, seq_len=261, table=table)
        args.update(miss)
        assert choose(**args)[0] == "triton", miss
    # an unbounded range covers long sequences; without a length only an every-length entry matches
    assert choose("attention", (9, 0), torch.bfloat16, 64, 10**6, table=[entry(min_len=513, max_len=None)])[0] == "cuda"
    assert choose("attention", (9, 0), torch.bfloat16, 64, None, table=table)[0] == "triton"
    assert choose("attention", (9, 0), torch.bfloat16, 64, None, table=[entry(max_len=None)])[0] == "cuda"
    assert choose("attention", (9, 0), torch.bfloat16, 64, None, table=[entry(min_len=1, max_len=None)])[0] == "triton"


def test_choose_narrowest_range_wins_and_reasons_for_triton_entries():
    table = [
        entry(min_len=0, max_len=None, backend="cuda"),
        entry(min_len=261, max_len=261, backend="triton", speedup=1.05, source="run B"),
        entry(min_len=261, max_len=261, backend="cuda", source="later, same width"),
    ]
    backend, reason = choose("attention", (9, 0), torch.bfloat16, 64, 261, table=table)
    assert backend == "triton" and "triton 1.05x faster than cuda" in reason and "N=261" in reason
    assert choose("attention", (9, 0), torch.bfloat16, 64, 262, table=table)[0] == "cuda"
    # triton kept although cuda was faster by less than the margin
    _, reason = choose("attention", (9, 0), torch.bfloat16, 64, 261, table=[entry(backend="triton", speedup=0.98)])
    assert "triton kept: cuda only 1.02x faster (below the margin)" in reason


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(op="mlp"), "op"),
        (dict(capability=(9, 0, 1)), "capability"),
        (dict(dtype="bf16"), "dtype"),
        (dict(dim=-1), "dim"),
        (dict(seq_len=-1), "seq_len"),
        (dict(seq_len=2.5), "seq_len"),
        (dict(table=[{"op": "attention"}]), "table"),
    ],
)
def test_choose_validates_arguments(kwargs, field):
    args = dict(op="attention", capability=(9, 0), dtype=torch.bfloat16, dim=64, seq_len=261, table=[])
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"^{field}:"):
        choose(**args)


def test_write_load_round_trip_and_cache(tmp_path):
    path = tmp_path / "nested" / "table.json"
    entries = [entry(), entry(op="layer_norm", dim=768, min_len=261, max_len=261, backend="triton", speedup=1.3)]
    assert write_table(entries, path) == path
    loaded = load_table(path)
    assert loaded == tuple(entries) and load_table(str(path)) is loaded  # cached per path
    data = json.loads(path.read_text())
    assert data["version"] == 1 and "comment" in data and len(data["entries"]) == 2
    backend, reason = choose("layer_norm", (9, 0), torch.bfloat16, 768, 261, table=path)
    assert backend == "triton" and "triton 1.30x faster than cuda" in reason
    # edits behind the cache's back are seen after clear_cache(); write_table clears it itself
    path.write_text(json.dumps({"version": 1, "entries": []}))
    assert load_table(path) is loaded
    dt.clear_cache()
    assert load_table(path) == ()
    write_table(entries[:1], path)
    assert load_table(path) == tuple(entries[:1])


def test_env_var_overrides_the_packaged_table(tmp_path, monkeypatch):
    path = write_table([entry(max_len=None)], tmp_path / "mine.json")
    monkeypatch.setenv(dt.ENV_VAR, str(path))
    assert dt.table_path() == path
    assert load_table() == (entry(max_len=None),)
    backend, reason = choose("attention", (9, 0), torch.bfloat16, 64, 261)
    assert backend == "cuda" and "measured" in reason
    assert str(path) in choose("attention", (8, 0), torch.bfloat16, 64, 261)[1]  # no-match reason names the file
    monkeypatch.setenv(dt.ENV_VAR, str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="missing.json: no such dispatch table file"):
        choose("attention", (9, 0), torch.bfloat16, 64, 261)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not a readable JSON dispatch table"),
        ("[]", "expected a JSON object"),
        ('{"version": 2, "entries": []}', "version: expected 1, got 2"),
        ('{"entries": []}', "version: expected 1, got None"),
        ('{"version": 1, "entries": {}}', "entries: expected a list"),
        ('{"version": 1, "entries": [{"op": "attention"}]}', r"entries\[0\]: capability: missing"),
    ],
)
def test_invalid_files_name_the_path(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        load_table(path)
    assert str(path) in str(info.value)


def test_invalid_entry_in_file_names_index_and_field(tmp_path):
    good = entry().to_dict()
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"version": 1, "entries": [good, dict(good, backend="xla")]}))
    with pytest.raises(ValueError, match=r"bad.json: entries\[1\]: backend: expected one of"):
        load_table(path)


def test_missing_file_given_explicitly_raises(tmp_path):
    with pytest.raises(ValueError, match="nope.json: no such dispatch table file"):
        load_table(tmp_path / "nope.json")


def test_missing_packaged_file_reads_as_empty(tmp_path, monkeypatch):
    # a build that left the JSON out of the package: no entries, triton everywhere, no crash on import or lookup
    monkeypatch.setattr(dt, "DEFAULT_PATH", tmp_path / "not-shipped.json")
    assert load_table() == ()
    assert choose("attention", (9, 0), torch.bfloat16, 64, 261)[0] == "triton"
