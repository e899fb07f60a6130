"""The public namespace: every public member exported by ``__all__`` (as httpx checks its own), each documented."""

from __future__ import annotations

import ast
import importlib
import inspect
import itertools
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import idembarrier
import idembarrier.asgi
import idembarrier.confluent
import idembarrier.faststream
import idembarrier.httpx
import idembarrier.kafka
import idembarrier.messaging
import idembarrier.nats
import idembarrier.rabbitmq
import idembarrier.redis

if TYPE_CHECKING:
    from types import ModuleType

NOT_API = frozenset({"annotations", "TYPE_CHECKING"})
"""Names a module binds for the compiler (``from __future__ import annotations``) and for the type checker."""
NAMESPACES = pytest.mark.parametrize(
    "module",
    [
        idembarrier,
        idembarrier.asgi,
        idembarrier.confluent,
        idembarrier.faststream,
        idembarrier.httpx,
        idembarrier.kafka,
        idembarrier.messaging,
        idembarrier.nats,
        idembarrier.rabbitmq,
        idembarrier.redis,
    ],
    ids=lambda m: m.__name__,
)
"""The public namespaces: the package and its documented subpackages."""
PACKAGE = Path(idembarrier.__file__).parent


def defining_modules() -> dict[str, str]:
    """Map each name that ``__init__.py`` re-exports to the private module it comes from."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    return {
        alias.asname or alias.name: f"idembarrier.{node.module}"
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is not None
        for alias in node.names
    }


def attribute_docstrings(module: str) -> dict[str, str]:
    """Return the docstrings written under module-level assignments, by the name assigned."""
    source = inspect.getsource(importlib.import_module(module))
    body = ast.parse(source).body
    found: dict[str, str] = {}
    for statement, following in itertools.pairwise(body):
        targets = statement.targets if isinstance(statement, ast.Assign) else []
        if isinstance(statement, ast.AnnAssign):
            targets = [statement.target]
        docstring = ast.get_docstring(ast.Module(body=[following], type_ignores=[]), clean=True)
        for target in targets:
            if isinstance(target, ast.Name) and docstring:
                found[target.id] = docstring
    return found


def is_documentable(member: object) -> bool:
    return inspect.isclass(member) or inspect.isfunction(member)


def public_members(module: ModuleType) -> set[str]:
    """The names a reader of ``module`` takes for its API, as httpx finds them: public, and not a submodule."""
    return {
        name
        for name, member in vars(module).items()
        if not name.startswith("_") and not inspect.ismodule(member) and name not in NOT_API
    }


@NAMESPACES
def test_all_imports_are_exported(module: ModuleType) -> None:
    """Every public member of the namespace is in its ``__all__``, and ``__all__`` names nothing else, once each."""
    assert set(module.__all__) == public_members(module)
    assert len(set(module.__all__)) == len(module.__all__)


@NAMESPACES
def test_namespace_has_docstring(module: ModuleType) -> None:
    """Each public namespace opens with a docstring of its own."""
    assert (module.__doc__ or "").strip()


@pytest.mark.parametrize("name", idembarrier.__all__)
def test_name_is_importable(name: str) -> None:
    """Each exported name imports from the package itself."""
    namespace: dict[str, object] = {}
    exec(f"from idembarrier import {name}", namespace)
    assert namespace[name] is getattr(idembarrier, name)


@pytest.mark.parametrize("name", [n for n in idembarrier.__all__ if is_documentable(getattr(idembarrier, n))])
def test_class_or_function_has_docstring(name: str) -> None:
    """Each exported class and function carries its own docstring."""
    member = getattr(idembarrier, name)
    assert member.__doc__ is not None
    assert member.__doc__.strip()


@pytest.mark.parametrize("name", [n for n in idembarrier.__all__ if not is_documentable(getattr(idembarrier, n))])
def test_constant_has_attribute_docstring(name: str) -> None:
    """Each exported constant or type alias is followed by a docstring where it is defined."""
    module = defining_modules()[name]
    assert attribute_docstrings(module).get(name), f"{name} in {module} has no docstring"


@pytest.mark.parametrize("name", [n for n in idembarrier.__all__ if inspect.isclass(getattr(idembarrier, n))])
def test_public_methods_have_docstrings(name: str) -> None:
    """Each public method and property defined on an exported class carries a docstring."""
    undocumented = []
    for attribute, value in vars(getattr(idembarrier, name)).items():
        if attribute.startswith("_"):
            continue
        function = value.fget if isinstance(value, property) else value
        function = getattr(function, "__func__", function)  # classmethod and staticmethod
        if inspect.isfunction(function) and not (function.__doc__ or "").strip():
            undocumented.append(attribute)
    assert undocumented == []
