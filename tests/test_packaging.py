"""What a release ships: an sdist with csrc/, and a wheel built from it that carries csrc/ as package data (so an
installed regkern can build its CUDA extension just in time), py.typed, the dispatch table and the license."""

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("attention.cu", "layer_norm.cu", "embed_tokens.cu", "ops.cpp", "regkern.h", "cuda_launch.cuh")


@pytest.mark.slow
def test_sdist_and_the_wheel_built_from_it_ship_the_csrc_sources(tmp_path):
    env = dict(os.environ, REGKERN_BUILD_CUDA="0")
    sdist = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert sdist.returncode == 0, sdist.stderr[-3000:]
    (archive,) = tmp_path.glob("regkern-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {f"csrc/{s}" for s in SOURCES} | {"csrc/emulation/emulated_ops.cpp", "LICENSE", "pyproject.toml"} <= names
    wheel = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(archive),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert wheel.returncode == 0, wheel.stderr[-3000:]
    (built,) = tmp_path.glob("regkern-*.whl")
    with zipfile.ZipFile(built) as whl:
        files = set(whl.namelist())
        metadata = next(whl.read(n).decode() for n in files if n.endswith(".dist-info/METADATA"))
    assert {f"regkern/csrc/{s}" for s in SOURCES} <= files
    assert {"regkern/py.typed", "regkern/ops/dispatch_table.json", "regkern/version.py"} <= files
    assert not any(n.endswith(".so") for n in files)  # REGKERN_BUILD_CUDA=0: Python only
    assert "License-Expression: Apache-2.0" in metadata
    from regkern.version import __version__

    assert f"Version: {__version__}" in metadata


def _readme_setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("Set up on a fresh machine", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_set_up_is_two_commands_that_ci_runs_verbatim_without_cuda_home():
    """A newcomer gets two commands (install + main job; test extras + tests); .ci/run runs exactly those, first,
    and never sets CUDA_HOME (the toolkit behind the nvcc on PATH must be found by regkern itself)."""
    commands = _readme_setup_commands()
    assert commands == ["pip install -e . && python -m regkern demo", 'pip install -e ".[test]" && python -m pytest']
    ci = (ROOT / ".ci" / "run").read_text()
    code_lines = [line.strip() for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    first_pip = next(i for i, line in enumerate(code_lines) if line.startswith("pip "))
    assert code_lines[first_pip : first_pip + 2] == commands
    assert "CUDA_HOME=" not in "\n".join(code_lines) and "export CUDA_HOME" not in ci
