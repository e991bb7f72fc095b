"""``regkern env``: every section of the bug-report text, the same facts as JSON, no build, no crash without the
optional packages."""

import json
import subprocess
import sys

import pytest
import torch

from regkern.apps import cli
from regkern.apps.env import attention_choice
from regkern.ops import cuda_ext
from regkern.ops.cuda_ext import ExtensionStatus
from regkern.ops.dispatch import compile_target

SECTIONS = (
    "versions",
    "CUDA toolkit",
    "GPU",
    "CUDA extension regkern._C",
    "attention backend for a ViT-B/14-reg4 call (B=1, N=261, H=12, d=64, float32 on cpu)",
    "environment",
)


@pytest.fixture
def no_gpu(monkeypatch):
    """The CPU answers, also on a machine with a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _field(text: str, name: str) -> str:
    """The value of the first ``  name  value`` line."""
    for line in text.splitlines():
        if line.startswith(f"  {name} "):
            return line[len(name) + 2 :].strip()
    raise AssertionError(f"no {name!r} line in:\n{text}")


def test_env_prints_every_section_and_auto_picks_torch_on_cpu(no_gpu, capsys, monkeypatch):
    monkeypatch.setenv("REGKERN_CACHE_DIR", "/some/cache")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert cli.main(["env"]) == 0
    text = capsys.readouterr().out
    headings = [line for line in text.splitlines() if line and not line.startswith(" ")]
    assert headings[0].startswith("regkern env")
    assert len(headings) == 1 + len(SECTIONS)
    assert all(heading.startswith(section) for heading, section in zip(headings[1:], SECTIONS)), headings
    assert _field(text, "torch").startswith(f"{torch.__version__} (")
    assert _field(text, "numpy") == __import__("numpy").__version__
    for name in ("python", "regkern", "triton", "timm", "path", "found", "nvcc", "problem", "prebuilt"):
        assert _field(text, name)
    assert _field(text, "just in time").startswith(("possible", "not possible: "))
    assert "none (torch.cuda.is_available() is False)" in text
    assert _field(text, "requested") == "auto (default)"
    assert _field(text, "backend") == "torch"
    assert _field(text, "why").startswith("auto (default): first supporting backend for cpu/float32")
    assert "  REGKERN_CACHE_DIR=/some/cache" in text and "  TRITON_INTERPRET=1" in text


def test_env_json_holds_the_same_facts(no_gpu, capsys):
    assert cli.main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) == {"versions", "cuda_toolkit", "gpus", "driver", "cuda_extension", "attention", "environment"}
    assert info["versions"]["torch"] == torch.__version__
    assert info["versions"]["torch_cuda"] == torch.version.cuda
    assert info["gpus"] == []
    assert info["attention"]["backend"] == "torch"
    assert info["cuda_toolkit"]["problem"] == cuda_ext.toolkit_problem(info["cuda_toolkit"]["path"])
    extension = info["cuda_extension"]
    assert extension["loaded"] == cuda_ext.status().loaded
    assert extension["jit_possible"] == (not extension["jit_problems"])


def test_env_says_not_installed_for_missing_triton_and_timm(no_gpu, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "timm", None)
    assert cli.main(["env"]) == 0
    text = capsys.readouterr().out
    assert _field(text, "triton") == "not installed" and _field(text, "timm") == "not installed"


def test_python_m_regkern_env_runs():
    result = subprocess.run([sys.executable, "-m", "regkern", "env"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert all(section in result.stdout for section in SECTIONS[:4])
    assert "No CUDA runtime is found" not in result.stderr  # torch's guess is reported, not logged


@pytest.fixture
def unbuilt_extension(monkeypatch):
    """The extension is not loaded and building it is forbidden: a build would take minutes."""

    def load(build=True):
        assert not build, "regkern env must not build the CUDA extension"
        return ExtensionStatus(False, "", False, "no prebuilt regkern._C (test); just-in-time build not attempted")

    monkeypatch.setattr(cuda_ext, "load", load)


def _cuda_table(tmp_path, monkeypatch):
    entry = {
        "op": "attention",
        "capability": [9, 0],
        "gpu": "NVIDIA H100",
        "dtype": "bfloat16",
        "dim": 64,
        "min_len": 0,
        "max_len": None,
        "backend": "cuda",
        "speedup": 1.3,
        "source": "test table",
    }
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"version": 1, "entries": [entry]}))
    monkeypatch.setenv("REGKERN_DISPATCH_TABLE", str(path))  # a new path: read afresh, not from the cache


def test_attention_choice_on_a_gpu_without_the_extension_never_builds_it(unbuilt_extension, tmp_path, monkeypatch):
    cuda = torch.device("cuda")
    with compile_target(90):  # a GPU's compute capability, without one
        plain = attention_choice(cuda, torch.bfloat16, 261, 64)
        assert plain["backend"] == "triton" and "no measured entry" in plain["reason"]
        _cuda_table(tmp_path, monkeypatch)
        preferred = attention_choice(cuda, torch.bfloat16, 261, 64)
        assert preferred["backend"] == "cuda, once built"
        assert "test table" in preferred["reason"] and "regkern env does not" in preferred["reason"]
        monkeypatch.setenv("REGKERN_BACKEND", "cuda")
        named = attention_choice(cuda, torch.bfloat16, 261, 64)
        assert named["requested"] == "cuda ($REGKERN_BACKEND)" and named["backend"] == "cuda, once built"


def test_attention_choice_follows_regkern_backend_on_cpu(unbuilt_extension, monkeypatch):
    monkeypatch.setenv("REGKERN_BACKEND", "reference")
    choice = attention_choice(torch.device("cpu"), torch.float32, 261, 64)
    assert choice == {
        "requested": "reference ($REGKERN_BACKEND)",
        "backend": "reference",
        "reason": "requested by $REGKERN_BACKEND",
    }
