"""The image installs only `[project].dependencies`: every module the product imports must
come from one of them, or the API and the worker fail at start in the image while every test
(run with the dev extra) passes."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("entities", "api", "workers", "deploy")


def _name(requirement: str) -> str:
    found = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert found is not None, requirement
    return re.sub(r"[-_.]+", "-", found.group()).lower()


def _runtime_distributions() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_name(requirement) for requirement in project["dependencies"]}


def _imported_modules() -> dict[str, str]:
    """Each top-level module the product imports, with one file that imports it."""
    found: dict[str, str] = {}
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def test_every_module_the_product_imports_is_a_runtime_dependency() -> None:
    runtime = _runtime_distributions()
    providers = packages_distributions()
    missing = {}
    for module, where in _imported_modules().items():
        if module in PRODUCT or module in sys.stdlib_module_names or module == "__future__":
            continue
        distributions = {_name(d) for d in providers.get(module, [])}
        assert distributions, f"{module} (imported by {where}) is not installed at all"
        if not distributions & runtime:
            missing[module] = (where, sorted(distributions))
    assert not missing, f"imported by the product but only a dev dependency: {missing}"
