"""pyproject.toml declares what the code imports, once each, in the right extra."""

from __future__ import annotations

import ast
import importlib.metadata
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
#: extras an installed server may use (the gates' tools are not among them)
RUNTIME_EXTRAS = {name for name in PROJECT.get("optional-dependencies", {})} - {"test", "dev"}


def _names(requirements: list[str]) -> list[str]:
    return [canonicalize_name(Requirement(r).name) for r in requirements]


def _imported_top_level(package: str = "tokenward") -> dict[str, str]:
    """Top-level modules imported anywhere under src/``package`` -> a file importing it."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "src" / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                found.setdefault(module.split(".")[0], str(path.relative_to(ROOT)))
    return found


def test_every_import_is_a_declared_dependency():
    declared = set(_names(PROJECT["dependencies"]))
    for extra in RUNTIME_EXTRAS:
        declared |= set(_names(PROJECT["optional-dependencies"][extra]))
    distributions = importlib.metadata.packages_distributions()
    undeclared = []
    for module, where in _imported_top_level().items():
        if module in sys.stdlib_module_names or module == "tokenward":
            continue
        providers = {canonicalize_name(d) for d in distributions.get(module, [])}
        assert providers, f"{where} imports {module}, which no installed distribution provides"
        if not providers & declared:
            undeclared.append(f"{module} ({where}; from {', '.join(sorted(providers))})")
    assert not undeclared, "imported but not declared in pyproject.toml: " + "; ".join(undeclared)


def test_each_dependency_is_listed_once():
    for group, requirements in [
        ("dependencies", PROJECT["dependencies"]),
        *PROJECT["optional-dependencies"].items(),
    ]:
        names = _names(requirements)
        doubled = sorted({n for n in names if names.count(n) > 1})
        assert not doubled, f"{group} lists {doubled} more than once"


def test_the_gates_tools_are_dev_only():
    extras = PROJECT["optional-dependencies"]
    assert {"ruff", "mypy"} <= set(_names(extras["dev"]))
    for extra, requirements in extras.items():
        if extra != "dev":
            assert not {"ruff", "mypy"} & set(_names(requirements)), extra
    install = (ROOT / "scripts" / "install").read_text()
    assert '".[test,dev]"' in install, "scripts/install must install what scripts/check runs"


def test_the_installed_uvicorn_is_in_the_tested_range():
    """server.py subclasses uvicorn's private HTTP protocol: a version outside the range the
    suite was run against must be tried (and the bound moved) before it is allowed."""
    (uvicorn,) = [Requirement(r) for r in PROJECT["dependencies"] if r.startswith("uvicorn")]
    assert any(spec.operator == "<" for spec in uvicorn.specifier), "uvicorn needs an upper bound"
    assert uvicorn.specifier.contains(importlib.metadata.version("uvicorn"))


def test_license_and_metadata():
    assert PROJECT["license"] == "Apache-2.0"
    assert PROJECT["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    # an SPDX expression in project.license needs setuptools 77 (PEP 639)
    assert "setuptools>=77" in build["requires"]
    assert PROJECT["urls"]["Source"].startswith("https://")
    # PEP 639: the license expression replaces "License ::" classifiers (setuptools refuses both)
    assert not [c for c in PROJECT["classifiers"] if c.startswith("License ::")]
