"""The project's own papers: dependency bounds, the README's module list, the error tree."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import tomllib
from pathlib import Path

import proxy
import proxy.errors

ROOT = Path(__file__).parent.parent


def requirements() -> dict[str, list[str]]:
    """The runtime dependencies ("") and each extra's, as written in pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {"": project["dependencies"], **project["optional-dependencies"]}


def test_runtime_dependencies_have_ranges_and_dev_tools_exact_pins() -> None:
    for extra, listed in requirements().items():
        for requirement in listed:
            if extra == "dev":
                assert re.fullmatch(r"[\w.-]+==[\w.]+", requirement), requirement
            else:
                assert re.fullmatch(r"[\w.-]+>=[\w.]+,<[\w.]+", requirement), requirement


def test_the_readme_lists_every_module() -> None:
    readme = (ROOT / "README.md").read_text()
    development = readme.partition("## Development")[2].partition("```text")[2].partition("```")[0]
    listed = {line.split()[0] for line in development.splitlines() if line.startswith("proxy/")}
    modules = {
        f"proxy/{path.name}"
        for path in (ROOT / "proxy").glob("*.py")
        if path.name not in ("__init__.py", "__main__.py")
    }
    assert listed == modules


def test_every_exception_of_the_package_is_drawn_in_the_error_tree() -> None:
    tree = proxy.errors.__doc__ or ""
    for module_info in pkgutil.iter_modules(proxy.__path__, "proxy."):
        module = importlib.import_module(module_info.name)
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
            ):
                assert re.search(rf"\b{name}\b", tree), f"{module.__name__}.{name}"
