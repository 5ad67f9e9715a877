"""What an installed copy of the package needs besides its Python modules.

The CPU kernels are C sources compiled on first use (``n2uq/kernels/cpu.py``): a wheel without them
still imports, but ``n2uq.LTQ`` silently (one warning) runs the plain PyTorch path, several times
slower. These tests keep ``pyproject.toml``'s package data and the kernels' cache key in step with
the files.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from n2uq.kernels import cpu

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "n2uq"


def _package_data_patterns() -> list[str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return config["tool"]["setuptools"]["package-data"]["n2uq"]


def _data_files() -> list[str]:
    """Files under n2uq/ that are not Python modules (paths relative to n2uq/)."""
    return sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*")
                  if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts)


def test_every_data_file_of_the_package_is_package_data():
    patterns = _package_data_patterns()
    files = _data_files()
    assert "kernels/cpu_kernels.c" in files and "paper_results.csv" in files
    missing = [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)]
    assert not missing, f"not in [tool.setuptools.package-data] of pyproject.toml: {missing}"


def test_the_kernel_cache_key_covers_every_file_the_source_includes():
    included, todo = set(), [cpu._SOURCE]
    while todo:
        for name in re.findall(r'#include "([^"]+)"', todo.pop().read_text()):
            if name not in included:
                included.add(name)
                todo.append(cpu._SOURCE.with_name(name))
    on_disk = {p.name for p in cpu._SOURCE.parent.glob("cpu_kernels*.h")}
    assert included == set(cpu._HEADERS) == on_disk


def test_the_wheel_carries_the_kernel_sources(tmp_path):
    """Builds the wheel from a copy of the sources (no ``*.egg-info`` of an editable install, whose file
    list setuptools would reuse; no network: the installed setuptools; about 2 s) and looks inside."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    shutil.copytree(PACKAGE, src / "n2uq", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("n2uq-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in _data_files() if f"n2uq/{f}" not in names]
    assert not missing, f"not in the wheel: {missing}"
