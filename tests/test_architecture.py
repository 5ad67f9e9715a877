"""The shape of the code: one-way dependencies, no import cycles, short files, short signatures.

The import contracts live in pyproject.toml (``[tool.importlinter]``): definitions (n2uq.quant,
n2uq.baselines, on n2uq.numerics / n2uq.bitwidth / n2uq.arrays) ← kernels (with ``n2uq.LTQ`` & co. in
n2uq.kernels.modules) ← method choice (n2uq.methods) ← blocks/models ← engine ← scripts, no cycle
among n2uq's modules, models never importing a kernel, the library never importing an architecture
folder or a script.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ["n2uq", "resnet", "mobilenetv2", "scripts"]
MAX_LINES = 400
MAX_PARAMETERS = 8

#: Functions whose signature is a ``torch.library`` operator schema (each tensor a separate argument)
#: or that operator's autograd/fake implementation, which must mirror it.
OPERATOR_SIGNATURES = {
    "n2uq/kernels/ltq_op.py": {"ltq_stage", "_ltq_stage_op", "_ltq_stage_backward_op", "_", "forward", "_setup",
                               "_backward"},
    "n2uq/kernels/cpu.py": {"ltq_backward"},
    "n2uq/kernels/triton_ops.py": {"ltq_backward", "ltq_forward"},  # and every @triton.jit kernel
    "n2uq/kernels/torch_ops.py": {"ltq_backward"},
}


def _python_files():
    for folder in SOURCE_DIRS:
        yield from sorted((ROOT / folder).rglob("*.py"))


def _has_import_linter() -> bool:
    try:
        import importlinter  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_import_linter(), reason="import-linter is not installed (pip install -e '.[dev]')")
def test_import_contracts_are_kept():
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports())"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def _source_files():
    """Python, the C kernels and their headers, and the shell entry points."""
    yield from _python_files()
    for folder in SOURCE_DIRS:
        for pattern in ("*.c", "*.h", "*.sh"):
            yield from sorted((ROOT / folder).rglob(pattern))
    yield from sorted(ROOT.glob("*.sh"))


def test_no_source_file_is_over_400_lines():
    files = list(_source_files())
    assert any(p.suffix == ".c" for p in files) and any(p.suffix == ".sh" for p in files)
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_no_function_takes_more_than_8_parameters():
    offenders = []
    for path in _python_files():
        rel = str(path.relative_to(ROOT))
        allowed = OPERATOR_SIGNATURES.get(rel, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in allowed \
                    and not any(ast.unparse(d) == "triton.jit" for d in node.decorator_list):
                args = node.args
                names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
                count = len([n for n in names if n not in ("self", "cls", "ctx")])
                if count > MAX_PARAMETERS:
                    offenders.append(f"{rel}:{node.lineno} {node.name} ({count})")
    assert not offenders, "functions with more than 8 parameters: " + ", ".join(offenders)
