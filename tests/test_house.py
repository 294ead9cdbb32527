"""House rules that hold across modules: no module reaches into another module's private names.

A name that starts with one underscore (`_split`, `_cached_step`) is private to the module that
defines it; a module whose name starts with one is private to its package. gpt_fn,
`benchmarks/` and `experiments/` import what they need from another module by a public name.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gpt_fn", "benchmarks", "experiments")


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def module_name(path: Path, root: Path) -> str:
    """`gpt_fn/sampling/decoding.py` -> `gpt_fn.sampling.decoding` (a package is its `__init__`)."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def private_uses(source: str, module: str, is_package: bool, modules: set[str]) -> list[str]:
    """Each place in `source` (the module `module`) that uses a private name of another of
    `modules`: `from m import _x`, `import m._x` / `from m._x import y` from outside `m`, and
    `m._x` where `m` is bound to a module by an import. One line each, with its line number."""
    package = module if is_package else module.rpartition(".")[0]
    found = []

    def other(target: str) -> bool:  # a project module other than this one
        return target != module and target in modules

    def private_module(target: str, line: int) -> None:
        parts = target.split(".")
        for i, part in enumerate(parts[1:], start=1):
            parent = ".".join(parts[:i])
            inside = module == parent or module.startswith(parent + ".")
            if _is_private(part) and target in modules and not inside:
                found.append(f"{line}: imports {target}, private to {parent}")

    bound: dict[str, str] = {}  # local name -> the project module it is bound to
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                private_module(alias.name, node.lineno)
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    bound[top] = top
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            private_module(base, node.lineno)
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in modules:
                    private_module(target, node.lineno)
                    bound[alias.asname or alias.name] = target
                elif _is_private(alias.name) and other(base):
                    found.append(f"{node.lineno}: from {base} import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            target = _dotted_module(node.value, bound, modules)
            if target is not None and other(target):
                found.append(f"{node.lineno}: {target}.{node.attr}")
    return sorted(set(found), key=lambda entry: int(entry.split(":")[0]))


def _dotted_module(node: ast.expr, bound: dict[str, str], modules: set[str]) -> str | None:
    """The project module an expression such as `gpt_fn.sampling.decoding` names, if any."""
    if isinstance(node, ast.Name):
        return bound.get(node.id)
    if isinstance(node, ast.Attribute):
        parent = _dotted_module(node.value, bound, modules)
        if parent is not None and f"{parent}.{node.attr}" in modules:
            return f"{parent}.{node.attr}"
    return None


def project_modules(root: Path) -> dict[str, Path]:
    return {
        module_name(path, root): path
        for package in PACKAGES
        for path in sorted((root / package).rglob("*.py"))
    }


def uses_in(source: str, module: str, is_package: bool = False) -> list[str]:
    modules = {"app", "pkg", "pkg.a", "pkg.b", "pkg._hidden", "pkg.sub", "pkg.sub.c"}
    return private_uses(source, module, is_package, modules)


@pytest.mark.parametrize(
    "source",
    [
        "from pkg.a import _helper",
        "from pkg.a import public, _helper as helper",
        "from . import a\na._helper()",
        "from .a import _helper",
        "from pkg import a\nx = a._helper",
        "import pkg.a\npkg.a._helper()",
        "import pkg.a as alias\nalias._helper()",
        "from pkg.sub import c\nc._helper()",
        "import pkg\npkg.sub.c._helper()",
    ],
)
def test_the_check_finds_a_private_name_used_across_modules(source):
    assert len(uses_in(source, "pkg.b")) == 1, source


@pytest.mark.parametrize(
    "source", ["from pkg._hidden import thing", "from pkg import _hidden", "import pkg._hidden"]
)
def test_the_check_finds_a_private_submodule_used_outside_its_package(source):
    assert len(uses_in(source, "app")) == 1, source


@pytest.mark.parametrize(
    "source",
    [
        "def _own(): ...\n_own()",  # a module's own private names
        "from pkg.a import helper, __version__",  # public and dunder names
        "import pkg.a\npkg.a.__name__",
        "from pkg.a import settings\nsettings._replace(x=1)",  # a NamedTuple's public API
        "import torch\ntorch._foreach_add_",  # third-party modules are their own business
        "from torch._C import Tag",
    ],
)
def test_the_check_allows_own_dunder_and_foreign_names(source):
    assert uses_in(source, "pkg.b") == [], source


def test_a_package_uses_its_own_private_submodule():
    assert uses_in("from pkg._hidden import thing", "pkg", is_package=True) == []
    assert uses_in("from ._hidden import thing", "pkg.a") == []
    assert uses_in("from .. import _hidden", "pkg.sub.c") == []
    assert uses_in("import pkg._hidden", "pkg.b") == []


def test_no_module_uses_another_modules_private_name():
    modules = project_modules(ROOT)
    names = set(modules)
    violations = [
        f"{path.relative_to(ROOT)}:{use}"
        for module, path in modules.items()
        for use in private_uses(path.read_text(), module, path.name == "__init__.py", names)
    ]
    assert violations == [], "private names used across modules:\n" + "\n".join(violations)
