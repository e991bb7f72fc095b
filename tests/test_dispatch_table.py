"""The measured triton-vs-cuda dispatch table: entries, lookup rules, files, and entries from a benchmark run."""

import json

import pytest
import torch

from regkern import dispatch_table as dt
from regkern.dispatch_table import DispatchEntry, choose, entries_from_bench, load_table, write_table

H100 = "NVIDIA H100 80GB HBM3"


def entry(**overrides) -> DispatchEntry:
    d = dict(op="attention", capability=(9, 0), gpu=H100, dtype="bfloat16", dim=64, min_len=0, max_len=512,
             backend="cuda", speedup=1.12, source="bench-results/results.json")
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


@pytest.mark.parametrize("field, value", [
    ("op", "softmax"), ("capability", (9,)), ("capability", "9.0"), ("capability", (9, -1)), ("gpu", ""),
    ("dtype", "bf16"), ("dim", 0), ("dim", 64.0), ("min_len", -1), ("max_len", -5), ("backend", "torch"),
    ("speedup", 0.0), ("speedup", float("nan")), ("speedup", True), ("source", None),
])
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
    assert reason == ("no measured entry for attention on sm_90 bfloat16 dim 64 N=261 in the given table; "
                      "default triton until GPU numbers exist")
    backend, reason = choose("layer_norm", (9, 0), "bfloat16", 768)
    assert backend == "triton" and f"any N in {dt.DEFAULT_PATH}" in reason


def test_choose_not_a_cuda_device():
    backend, reason = choose("attention", None, torch.float32, 64, 261, table=[entry(dtype="float32")])
    assert backend == "triton" and "not a CUDA device" in reason


def test_choose_matching_rules():
    table = [entry(min_len=0, max_len=512)]
    backend, reason = choose("attention", (9, 0), torch.bfloat16, 64, 261, table=table)
    assert backend == "cuda"
    assert reason == ("measured: cuda 1.12x faster than triton on NVIDIA H100 80GB HBM3 for attention sm_90 bfloat16 "
                      "dim 64 N in [0, 512] (bench-results/results.json)")
    assert choose("attention", [9, 0], "torch.bfloat16", 64, 512, table=table)[0] == "cuda"  # inclusive bound
    for miss in [dict(seq_len=513), dict(capability=(8, 0)), dict(dtype=torch.float16), dict(dim=128),
                 dict(op="layer_norm")]:
        args = dict(op="attention", capability=(9, 0), dtype=torch.bfloat16, dim=64, seq_len=261, table=table)
        args.update(miss)
        assert choose(**args)[0] == "triton", miss
    # an unbounded range covers long sequences; without a length only an every-length entry matches
    assert choose("attention", (9, 0), torch.bfloat16, 64, 10**6, table=[entry(min_len=513, max_len=None)])[0] == "cuda"
    assert choose("attention", (9, 0), torch.bfloat16, 64, None, table=table)[0] == "triton"
    assert choose("attention", (9, 0), torch.bfloat16, 64, None, table=[entry(max_len=None)])[0] == "cuda"
    assert choose("attention", (9, 0), torch.bfloat16, 64, None, table=[entry(min_len=1, max_len=None)])[0] == "triton"


def test_choose_narrowest_range_wins_and_reasons_for_triton_entries():
    table = [entry(min_len=0, max_len=None, backend="cuda"),
             entry(min_len=261, max_len=261, backend="triton", speedup=1.05, source="run B"),
             entry(min_len=261, max_len=261, backend="cuda", source="later, same width")]
    backend, reason = choose("attention", (9, 0), torch.bfloat16, 64, 261, table=table)
    assert backend == "triton" and "triton 1.05x faster than cuda" in reason and "N=261" in reason
    assert choose("attention", (9, 0), torch.bfloat16, 64, 262, table=table)[0] == "cuda"
    # triton kept although cuda was faster by less than the margin
    _, reason = choose("attention", (9, 0), torch.bfloat16, 64, 261, table=[entry(backend="triton", speedup=0.98)])
    assert "triton kept: cuda only 1.02x faster (below the margin)" in reason


@pytest.mark.parametrize("kwargs, field", [
    (dict(op="mlp"), "op"), (dict(capability=(9, 0, 1)), "capability"), (dict(dtype="bf16"), "dtype"),
    (dict(dim=-1), "dim"), (dict(seq_len=-1), "seq_len"), (dict(seq_len=2.5), "seq_len"),
    (dict(table=[{"op": "attention"}]), "table"),
])
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


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a readable JSON dispatch table"),
    ("[]", "expected a JSON object"),
    ('{"version": 2, "entries": []}', "version: expected 1, got 2"),
    ('{"entries": []}', "version: expected 1, got None"),
    ('{"version": 1, "entries": {}}', "entries: expected a list"),
    ('{"version": 1, "entries": [{"op": "attention"}]}', r"entries\[0\]: capability: missing"),
])
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


# ------------------------------------------------------------------------------------------ from a benchmark run

ENV = {"device": H100, "capability": [9, 0], "commit": "abc1234", "dtype": "torch.bfloat16"}


def case(shape, contender, median_s, mode="fwd", **extra):
    return {"name": f"test_x[{shape}-{contender}-{mode}]", "stats": {"median": median_s},
            "extra_info": dict(ENV, shape=shape, mode=mode, contender=contender, **extra)}


def attention(shape, contender, median_s, N, mode="fwd", **extra):
    return case(shape, contender, median_s, mode, op="attention", B=8, N=N, H=12, d=64, **extra)


def bench_results(*cases):
    return {"datetime": "2026-11-25T12:00:00", "benchmarks": list(cases)}


def twin_run():
    """A run where cuda is twice as fast as triton at one attention shape."""
    return bench_results(attention("vitb", "regkern-triton", 2e-4, 261), attention("vitb", "regkern-cuda", 1e-4, 261))


def test_entries_from_bench_margin_and_pairs():
    results = bench_results(
        attention("vitb", "regkern-triton", 110e-6, 261), attention("vitb", "regkern-cuda", 100e-6, 261),  # 1.10x
        attention("vits", "regkern-triton", 101e-6, 197), attention("vits", "regkern-cuda", 100e-6, 197),  # 1.01x
        attention("vitb", "regkern-triton-R4", 300e-6, 261), attention("vitb", "regkern-cuda-R4", 100e-6, 261),
        attention("vitb", "regkern-triton", 900e-6, 261, mode="fwd+bwd"),
        attention("vitb", "regkern-cuda", 100e-6, 261, mode="fwd+bwd"),
        attention("vitl", "regkern-triton", 500e-6, 1374),  # no cuda twin in this run
        attention("vitb", "timm", 50e-6, 261),
        case("ln", "regkern-triton", 20e-6, op="layer_norm", N=261, C=768),
        case("ln", "regkern-cuda", 25e-6, op="layer_norm", N=261, C=768),
        case("ln", "torch", 10e-6, op="layer_norm", N=261, C=768),
        case("embed", "regkern-reference", 30e-6, op="embed_tokens", N=261, M=256, C=768),
        case("embed", "regkern-cuda", 10e-6, op="embed_tokens", N=261, M=256, C=768),
        {"name": "test_model_inference[vitb]", "stats": {"median": 0.5}, "extra_info": dict(ENV, model="vit")},
    )
    entries = {(e.op, e.min_len): e for e in entries_from_bench(results, source="results.json")}
    assert set(entries) == {("attention", 261), ("attention", 197), ("layer_norm", 0), ("embed_tokens", 261)}
    b = entries["attention", 261]
    assert (b.backend, b.capability, b.gpu, b.dtype, b.dim, b.min_len, b.max_len) == (
        "cuda", (9, 0), H100, "bfloat16", 64, 261, 261)
    assert b.speedup == pytest.approx(1.1)  # the plain contenders: R4 and fwd+bwd do not count
    assert b.source.startswith("results.json, 2026-11-25T12:00:00, commit abc1234: regkern-cuda 100.0 us vs "
                               "regkern-triton 110.0 us")
    s = entries["attention", 197]
    assert s.backend == "triton" and s.speedup == pytest.approx(1 / 1.01)  # cuda faster, but under the margin
    ln = entries["layer_norm", 0]  # LayerNorm modules choose without N: one entry for every length
    assert (ln.backend, ln.dim, ln.max_len) == ("triton", 768, None) and ln.speedup == pytest.approx(1.25)
    assert choose("layer_norm", (9, 0), torch.bfloat16, 768, table=[ln])[0] == "triton"
    em = entries["embed_tokens", 261]
    assert em.backend == "cuda" and em.speedup == pytest.approx(3.0) and "regkern-reference" in em.source
    # the entries then drive choose()
    assert choose("attention", (9, 0), torch.bfloat16, 64, 261, table=list(entries.values()))[0] == "cuda"
    assert choose("attention", (9, 0), torch.bfloat16, 64, 197, table=list(entries.values()))[0] == "triton"
    assert entries_from_bench(results, margin=1.0)[0].backend == "cuda"  # 197 at margin 1.0: cuda
    assert [e.backend for e in entries_from_bench(results, margin=1.5) if e.op == "attention"] == ["triton"] * 2


def test_entries_from_bench_pools_shapes_with_one_key():
    # two batch sizes at the same N and head dim make one entry: ratio of the summed medians
    results = bench_results(
        attention("vitl", "regkern-triton", 300e-6, 1374), attention("vitl", "regkern-cuda", 200e-6, 1374),
        attention("vitg", "regkern-triton", 300e-6, 1374), attention("vitg", "regkern-cuda", 400e-6, 1374))
    (e,) = entries_from_bench(results)
    assert e.backend == "triton" and e.speedup == pytest.approx(1.0) and "vitg+vitl" in e.source


def test_entries_from_bench_without_cuda_cases_is_empty_and_roundtrips(tmp_path):
    assert entries_from_bench(bench_results(attention("vitb", "regkern-triton", 1e-4, 261))) == []
    assert entries_from_bench({"benchmarks": []}) == []
    results = twin_run()
    path = write_table(entries_from_bench(results), tmp_path / "t.json")
    assert load_table(path) == tuple(entries_from_bench(results))


def test_entries_from_bench_rejects_bad_input():
    with pytest.raises(ValueError, match="^results:"):
        entries_from_bench({"cases": []})
    with pytest.raises(ValueError, match="^margin:"):
        entries_from_bench({"benchmarks": []}, margin=0.9)
    old = twin_run()
    for b in old["benchmarks"]:
        b["extra_info"].pop("capability")
    with pytest.raises(ValueError, match="records no 'capability'"):
        entries_from_bench(old)


def test_attention_cases_recorded_before_the_op_field_count_as_attention():
    results = twin_run()
    for b in results["benchmarks"]:
        b["extra_info"].pop("op")
    (e,) = entries_from_bench(results)
    assert (e.op, e.backend) == ("attention", "cuda")
