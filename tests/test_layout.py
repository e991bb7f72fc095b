"""The package's layout is a contract: layers import one way, no module uses another's private names, lazy imports
are only for optional dependencies (and say so), tests mirror the package, and the public names stay."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import regkern

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "regkern"
SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "csrc" not in p.parts)

#: third-party packages the library imports only inside functions, each with a "lazy import" comment
LAZY_OK = ("timm", "PIL", "matplotlib", "pytest", "safetensors", "tqdm", "torch.utils", "triton")

#: what ``regkern`` exported before the package was layered (issue 11): every name must still be there
EXPORTED_BEFORE = [
    "__version__",
    "reference",
    "cuda_ext",
    "register_attention",
    "layer_norm_with_norms",
    "embed_tokens",
    "AttentionStats",
    "STAT_NAMES",
    "RegisterViTAttention",
    "RegisterEvaAttention",
    "patch_timm",
    "unpatch_timm",
    "explain",
    "get_monitor",
    "NormMonitor",
    "MonitoredLayerNorm",
    "add_registers",
    "register_parameters",
    "freeze_all_but_registers",
    "find_register_neurons",
    "apply_test_time_registers",
    "RegisterNeurons",
    "TestTimeRegisters",
    "NormReport",
    "BACKENDS",
    "AUTO_ORDER",
    "AttentionRequest",
    "get_backend",
    "resolve_backend",
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names."""
    if not node.level:
        return node.module or ""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_uses_another_modules_private_names(path):
    tree = ast.parse(path.read_text())
    module_aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = resolve(path, node)
            if not source.startswith("regkern"):
                continue
            for alias in node.names:
                assert not private(alias.name), f"{path.name} imports the private {source}.{alias.name}"
                module_aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("regkern"):
                    module_aliases.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in module_aliases:
            assert not private(node.attr), f"{path.name}:{node.lineno} uses the private {node.value.id}.{node.attr}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_function_level_imports_are_commented_lazy_imports_of_optional_dependencies(path):
    text = path.read_text()
    lines = text.splitlines()
    for func in ast.walk(ast.parse(text)):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        imports = [n for n in ast.walk(func) if isinstance(n, (ast.Import, ast.ImportFrom))]
        if not imports:
            continue
        for node in imports:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [resolve(path, node)]
            for name in names:
                own_kernels = name.startswith("regkern.ops.") and {a.name for a in node.names} == {"triton_kernels"}
                assert own_kernels or name.startswith(LAZY_OK), (
                    f"{path.name}:{node.lineno}: function-level import of {name} (import it at the top; layers "
                    "import downwards only)"
                )
        first = min(n.lineno for n in imports)
        above = [line.strip() for line in lines[: first - 1] if line.strip()][-3:]  # a comment block, a `try:`
        assert any(line.startswith("#") and "lazy import" in line for line in above), (
            f"{path.name}:{first}: a function-level import needs a '# lazy import of ...: why' comment above it"
        )


def test_import_linter_layers_contract():
    lint = shutil.which("lint-imports")
    if lint is None:
        pytest.skip("import-linter is not installed (pip install import-linter); .ci/run runs it")
    result = subprocess.run([lint], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


def test_tests_mirror_the_package():
    for folder in sorted(p for p in PACKAGE.rglob("*") if p.is_dir() and p.name not in ("__pycache__", "csrc")):
        if not list(folder.glob("*.py")):
            continue
        mirror = ROOT / "tests" / folder.relative_to(PACKAGE)
        if folder.parent.name == "timm" and folder.name == "test_time_registers":
            mirror = mirror.parent  # one test module covers detection and application
        assert mirror.is_dir() and list(mirror.glob("test_*.py")), f"no tests for {folder.relative_to(ROOT)}"


def test_everything_exported_before_is_still_exported():
    missing = [name for name in EXPORTED_BEFORE if not hasattr(regkern, name)]
    assert not missing
    assert set(EXPORTED_BEFORE) <= set(regkern.__all__)
    assert regkern.cuda_ext.load is regkern.ops.cuda_ext.load
    assert regkern.dispatch_table.choose is regkern.ops.dispatch_table.choose


def test_one_version_source():
    from regkern.version import __version__

    assert regkern.__version__ == __version__
    out = subprocess.run([sys.executable, "-m", "regkern", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == f"regkern {__version__}"
    assert "version" not in (ROOT / "setup.py").read_text().split("setup(")[-1]
    assert 'dynamic = ["version"]' in (ROOT / "pyproject.toml").read_text()
