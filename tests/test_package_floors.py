"""Packages import downward only: `contentv_common` imports none of ours, `contentv_jax` never imports torch nor
`convert` (the key maps and format readers both use live in `contentv_common.formats`), `contentv_torch` never
imports jax. Each package's modules are all imported in a fresh interpreter, which then
reports what `sys.modules` holds (an import anywhere below, direct or not, shows up)."""
from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "contentv_common": ("contentv_jax", "contentv_torch", "convert", "benchmarks", "jax", "torch", "flax"),
    "contentv_jax": ("torch", "contentv_torch", "convert"),
    "contentv_torch": ("jax", "flax", "contentv_jax"),
}

_PROBE = """
import importlib, json, pkgutil, sys
pkg = importlib.import_module(sys.argv[1])
for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
    if not m.name.endswith("__main__"):
        importlib.import_module(m.name)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def imported_roots(package: str) -> set[str]:
    """Top-level names in sys.modules after importing every module of `package` in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", _PROBE, package], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_downward(package):
    modules = [m.name for m in pkgutil.iter_modules([str(ROOT / package)])]
    assert len(modules) >= 3, f"{package}: found no modules to walk"
    leaked = sorted(set(FORBIDDEN[package]) & imported_roots(package))
    assert not leaked, f"importing all of {package} also imports {leaked}"


def import_statements(package: str) -> dict[str, set[str]]:
    """module file -> top-level names of every import statement in it, deferred ones inside functions included."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        roots = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = roots
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_deferred_import_crosses_a_floor(package):
    """Deferred imports (inside functions) would only fail when that path runs on a host without the package."""
    bad = {f: sorted(roots & set(FORBIDDEN[package])) for f, roots in import_statements(package).items()}
    bad = {f: r for f, r in bad.items() if r}
    assert not bad, f"{package} modules import across the floor: {bad}"
