"""The one dispatch core (regkern.ops.dispatch): named backends refuse with reasons, "auto" is one policy for every op
(measured table first, then the op's auto order on the device types each backend allows), and every op family uses
it."""

import json
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

from regkern.ops import dispatch, dispatch_table
from regkern.ops.attention import DISPATCHER as ATTENTION
from regkern.ops.attention import AttentionRequest
from regkern.ops.dispatch import Backend, Dispatcher, UnavailableBackend
from regkern.ops.embed_tokens import DISPATCHER as EMBED
from regkern.ops.embed_tokens.backends import EmbedTokensRequest
from regkern.ops.layer_norm import DISPATCHER as LAYER_NORM
from regkern.ops.layer_norm.backends import LayerNormRequest


@dataclass(frozen=True)
class Request:
    device_type: str = "cpu"
    dtype: torch.dtype = torch.float32
    dim: int = 64
    capability: Optional[tuple[int, int]] = None
    seq_len: Optional[int] = None
    features: frozenset = field(default_factory=frozenset)

    def describe(self):
        return "this toy call"


class Fast(Backend):
    name = "triton"
    description = "fast, GPU only under auto"
    auto_device_types = ("cuda",)
    dtypes = (torch.float16, torch.float32)
    features = frozenset({"stats"})


class Measured(Backend):
    name = "cuda"
    description = "picked by auto only where measured faster"
    measured = True
    dtypes = (torch.float16,)


class Slow(Backend):
    name = "reference"
    description = "everything"

    def not_supported_reasons(self, request):
        return []


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.delenv("TOY_BACKEND", raising=False)
    return Dispatcher(
        "attention",
        "toy",
        (Fast(), Measured(), Slow()),
        ("triton", "reference"),
        env_var="TOY_BACKEND",
        refusal="backend: {name!r} cannot run {what}: {reasons}",
    )


def test_backends_declare_support_and_say_why_not_in_words():
    reasons = Fast().not_supported_reasons(Request(device_type="mps", dtype=torch.bfloat16, features={"mask"}))
    assert reasons == [
        "device type 'mps' is not supported (cuda, cpu)",
        "dtype bfloat16 is not supported (float16, float32)",
        "mask not supported by the triton backend",
    ]
    assert Fast().not_supported_reasons(Request(features=frozenset({"stats"}))) == []


def test_explicit_names_run_or_refuse_with_reasons(toy, monkeypatch):
    assert toy.resolve("triton", Request()).reason == "requested by backend argument"
    with pytest.raises(ValueError, match=r"backend: 'triton' cannot run this toy call: dtype float64"):
        toy.resolve("triton", Request(dtype=torch.float64))
    with pytest.raises(ValueError, match=r"backend: unknown toy backend 'trition'; expected one of \['auto', "):
        toy.resolve("trition", Request())
    with pytest.raises(TypeError, match="backend: expected a string"):
        toy.resolve(3, Request())
    monkeypatch.setenv("TOY_BACKEND", "reference")
    choice = toy.resolve(None, Request())
    assert choice.name == "reference" and choice.reason == "requested by $TOY_BACKEND"
    assert toy.check_name(None) == "reference" and toy.names == ("auto", "triton", "cuda", "reference")


def test_auto_follows_device_types_then_order(toy):
    cpu = toy.resolve(None, Request())
    assert cpu.name == "reference" and "skipped triton: auto uses it on cuda only" in cpu.reason
    gpu = toy.resolve("auto", Request(device_type="cuda", capability=(9, 0), seq_len=261))
    assert gpu.name == "triton" and "cuda: no measured entry for attention on sm_90" in gpu.reason
    unsupported = toy.resolve("auto", Request(device_type="cuda", dtype=torch.float64))
    assert unsupported.name == "reference" and "dtype float64 is not supported" in unsupported.reason


def test_auto_takes_the_measured_table_first(toy, tmp_path, monkeypatch):
    entry = dict(
        op="attention",
        capability=[9, 0],
        gpu="NVIDIA H100",
        dtype="float16",
        dim=64,
        min_len=261,
        max_len=261,
        backend="cuda",
        speedup=1.3,
        source="toy table",
    )
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"version": 1, "entries": [entry]}))
    monkeypatch.setenv(dispatch_table.ENV_VAR, str(path))
    dispatch_table.clear_cache()
    try:
        request = Request(device_type="cuda", dtype=torch.float16, capability=(9, 0), seq_len=261)
        choice = toy.resolve(None, request)
        assert choice.name == "cuda" and "1.30x faster" in choice.reason and "toy table" in choice.reason
        # the table prefers cuda but cuda cannot run: the reasons are kept and the order goes on
        refused = toy.resolve(None, Request(device_type="cuda", dtype=torch.float32, capability=(9, 0), seq_len=261))
        assert refused.name == "triton"
        other_n = toy.resolve(None, Request(device_type="cuda", dtype=torch.float16, capability=(9, 0), seq_len=197))
        assert other_n.name == "triton"
    finally:
        dispatch_table.clear_cache()


def test_modules_get_an_unavailable_stand_in_that_raises_when_called(toy):
    choice = toy.resolve_or_unavailable("triton", Request(dtype=torch.float64))
    assert not choice.available and choice.name == "triton (unavailable)"
    assert isinstance(choice.backend, UnavailableBackend)
    with pytest.raises(RuntimeError, match="cannot run this toy call"):
        choice.backend.attention()


def test_every_op_family_uses_the_one_dispatcher():
    for d, op in ((ATTENTION, "attention"), (LAYER_NORM, "layer_norm"), (EMBED, "embed_tokens")):
        assert isinstance(d, Dispatcher) and d.op == op and "reference" in d.backends
        assert [b.name for b in d.backends.values() if b.measured] == ["cuda"]
        assert all(isinstance(b, Backend) for b in d.backends.values())
    assert dispatch.Dispatcher.resolve is ATTENTION.resolve.__func__ is LAYER_NORM.resolve.__func__


def _request(op, device_type, dtype):
    capability = (9, 0) if device_type == "cuda" else None
    if op == "attention":
        return AttentionRequest(device_type, dtype, 64, capability=capability, seq_len=17)
    if op == "layer_norm":
        return LayerNormRequest(device_type, dtype, 64, capability)
    return EmbedTokensRequest(device_type, dtype, 64, capability, 21, (dtype, dtype, dtype))


@pytest.mark.parametrize("dispatcher", [ATTENTION, LAYER_NORM, EMBED], ids=lambda d: d.op)
def test_declared_support_agrees_with_the_reasons(dispatcher):
    """What a backend declares (device types, dtypes per device) is what it refuses: every undeclared combination
    gets reasons in words (declared ones may still be refused for other reasons, e.g. a missing extension)."""
    for backend in dispatcher.backends.values():
        for device_type in ("cpu", "cuda", "mps"):
            for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                declared = backend.runs_on(device_type) and dtype in backend.supported_dtypes(device_type)
                if not declared:
                    reasons = backend.not_supported_reasons(_request(dispatcher.op, device_type, dtype))
                    assert reasons, (backend.name, device_type, dtype)


def test_compile_target_sets_what_cuda_devices_report_and_restores_it():
    from regkern.ops.dispatch import compile_target, device_capability, multiprocessor_count

    cuda = torch.device("cuda")
    with compile_target(90):
        assert device_capability(cuda) == (9, 0) and multiprocessor_count(cuda) == 132
        with compile_target(86, multiprocessors=84):
            assert device_capability(cuda) == (8, 6) and multiprocessor_count(cuda) == 84
        assert device_capability(cuda) == (9, 0)
    assert device_capability(torch.device("cpu")) is None
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, AssertionError)):  # outside the block the (absent) device is asked
            device_capability(cuda)
