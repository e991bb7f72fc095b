"""The dispatch-table writer of the benchmark app: entries from a benchmark run, written and read back."""

import pytest
import torch

from regkern.apps.dispatch_table_writer import entries_from_bench, write_table
from regkern.ops import dispatch_table as dt
from regkern.ops.dispatch_table import choose, load_table

H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture(autouse=True)
def _fresh_tables(monkeypatch):
    # each test reads its own files: no developer $REGKERN_DISPATCH_TABLE, no table cached by another test
    monkeypatch.delenv(dt.ENV_VAR, raising=False)
    dt.clear_cache()
    yield
    dt.clear_cache()


ENV = {"device": H100, "capability": [9, 0], "commit": "abc1234", "dtype": "torch.bfloat16"}


def case(shape, contender, median_s, mode="fwd", **extra):
    return {
        "name": f"test_x[{shape}-{contender}-{mode}]",
        "stats": {"median": median_s},
        "extra_info": dict(ENV, shape=shape, mode=mode, contender=contender, **extra),
    }


def attention(shape, contender, median_s, N, mode="fwd", **extra):
    return case(shape, contender, median_s, mode, op="attention", B=8, N=N, H=12, d=64, **extra)


def bench_results(*cases):
    return {"datetime": "2026-11-25T12:00:00", "benchmarks": list(cases)}


def twin_run():
    """A run where cuda is twice as fast as triton at one attention shape."""
    return bench_results(attention("vitb", "regkern-triton", 2e-4, 261), attention("vitb", "regkern-cuda", 1e-4, 261))


def test_entries_from_bench_margin_and_pairs():
    results = bench_results(
        attention("vitb", "regkern-triton", 110e-6, 261),
        attention("vitb", "regkern-cuda", 100e-6, 261),  # 1.10x
        attention("vits", "regkern-triton", 101e-6, 197),
        attention("vits", "regkern-cuda", 100e-6, 197),  # 1.01x
        attention("vitb", "regkern-triton-R4", 300e-6, 261),
        attention("vitb", "regkern-cuda-R4", 100e-6, 261),
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
        "cuda",
        (9, 0),
        H100,
        "bfloat16",
        64,
        261,
        261,
    )
    assert b.speedup == pytest.approx(1.1)  # the plain contenders: R4 and fwd+bwd do not count
    assert b.source.startswith(
        "results.json, 2026-11-25T12:00:00, commit abc1234: regkern-cuda 100.0 us vs regkern-triton 110.0 us"
    )
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
        attention("vitl", "regkern-triton", 300e-6, 1374),
        attention("vitl", "regkern-cuda", 200e-6, 1374),
        attention("vitg", "regkern-triton", 300e-6, 1374),
        attention("vitg", "regkern-cuda", 400e-6, 1374),
    )
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
