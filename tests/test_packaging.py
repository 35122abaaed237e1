"""The declared dependencies match what the code imports and what the environment holds."""

import ast
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, packages_distributions, version

from packaging.requirements import Requirement

from conftest import ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

FIRST_PARTY = {"groundset"}
# Imported but installed apart from pyproject's dependencies, with the reason.
INSTALLED_APART = {
    # a source package whose build imports torch: the Makefile builds it against the pinned
    # torch (--no-build-isolation); declared, pip would build it in isolation with another torch
    "sam2": "sam2==1.1.0",
}


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_requirements() -> list[Requirement]:
    """The `[project] dependencies` of pyproject.toml."""
    with open(ROOT / "pyproject.toml", "rb") as handle:
        project = tomllib.load(handle)["project"]
    return [Requirement(line) for line in project["dependencies"]]


def imported_modules() -> dict[str, set[str]]:
    """Top-level modules imported anywhere (lazy imports too) by the package, scripts and rules."""
    found: dict[str, set[str]] = {}

    def add(module: str, where: str) -> None:
        found.setdefault(module.split(".")[0], set()).add(where)

    sources = [*(ROOT / "src" / "groundset").rglob("*.py"), *(ROOT / "workflow").rglob("*.py")]
    for path in sources:
        where = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=where)):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, where)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                add(node.module, where)
    # Snakemake files are not Python to `ast`; their imports are plain statements.
    for path in [ROOT / "Snakefile", *(ROOT / "workflow" / "rules").glob("*.smk")]:
        for line in path.read_text(encoding="utf-8").splitlines():
            match = re.match(r"\s*(?:import|from)\s+([A-Za-z_][\w.]*)", line)
            if match:
                add(match.group(1), str(path.relative_to(ROOT)))
    return {
        module: places
        for module, places in found.items()
        if module not in sys.stdlib_module_names and module not in FIRST_PARTY
    }


def test_pip_check_passes():
    done = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_imported_module_is_a_declared_distribution():
    declared = {normalize(req.name) for req in declared_requirements()}
    owners = packages_distributions()
    undeclared = {}
    for module, places in sorted(imported_modules().items()):
        if module in INSTALLED_APART:
            continue
        dists = {normalize(d) for d in owners.get(module, [])}
        if not dists & declared:
            undeclared[module] = (sorted(dists) or "not installed", sorted(places))
    assert undeclared == {}, "imported but not in pyproject.toml's dependencies"


def test_declared_requirements_are_installed_at_their_versions():
    # pip check reads the installed metadata, which trails an edited pyproject.toml until the
    # next install: compare pyproject's own requirements with what the environment holds
    wrong = {}
    for req in declared_requirements():
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            wrong[req.name] = "not installed"
            continue
        if not req.specifier.contains(installed, prereleases=True):
            wrong[req.name] = f"{installed} does not satisfy {req.specifier}"
    assert wrong == {}


def test_packages_installed_apart_are_installed_by_the_makefile():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for module, pin in INSTALLED_APART.items():
        assert pin in makefile, f"{module}: the Makefile no longer installs {pin}"
        assert module in imported_modules(), f"{module} is no longer imported: drop it here"
        name, _, wanted = pin.partition("==")
        assert version(name) == wanted
