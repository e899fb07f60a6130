"""The guide cannot rot: its Python examples compile and type-check, and its layer diagram matches the imports.

Every ```python block of ``README.md`` and ``docs/*.md`` is compiled as a module in which top-level ``await``
is allowed (as in an async REPL); a block that shows a handler's body on its own (it ends in ``return``) is
compiled as the body of an ``async def``. All blocks are then type-checked by mypy in one run, each as the
body of an ``async def`` in a module that first imports `GUIDE_CONTEXT`: the names a block takes from the
code around it (the reader's ``sessionmaker``, ``Payment`` model, ``gateway``…), declared with their types.
The README's quickstart also runs, on PostgreSQL (``tests/test_readme.py``).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
PACKAGE = ROOT / "idembarrier"

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def fenced_blocks(text: str, language: str) -> list[tuple[int, str]]:
    """The ```language blocks of a Markdown text, each with the line its code starts on."""
    return [
        (text.count("\n", 0, match.start(2)) + 1, match.group(2))
        for match in _FENCE.finditer(text)
        if match.group(1) == language
    ]


def python_blocks(text: str) -> list[tuple[int, str]]:
    """The ```python blocks of a Markdown text, each with the line its code starts on."""
    return fenced_blocks(text, "python")


def as_async_body(code: str, name: str = "_example") -> str:
    """``code`` as the body of ``async def name()``: how a handler's excerpt, or a REPL session, runs."""
    return f"async def {name}() -> object:\n{textwrap.indent(code, '    ')}\n    return None\n"


EXAMPLES = [
    pytest.param(code, f"{page.relative_to(ROOT)}:{line}", id=f"{page.relative_to(ROOT)}:{line}")
    for page in PAGES
    for line, code in python_blocks(page.read_text())
]


def test_the_guide_has_examples_on_several_pages() -> None:
    """The extraction finds the README's quickstart and the guide's examples (a broken fence finds none)."""
    where = {str(example.values[1]).split(":")[0] for example in EXAMPLES}
    assert {"README.md", "docs/leases.md", "docs/http.md", "docs/messaging.md", "docs/operations.md"} <= where


@pytest.mark.parametrize(("code", "where"), EXAMPLES)
def test_example_compiles(code: str, where: str) -> None:
    """The example is valid Python: as a module with top-level await, or else as a handler's body."""
    try:
        compile(code, where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
    except SyntaxError as exc:
        if exc.msg != "'return' outside function":
            raise
        compile(as_async_body(code), where, "exec", dont_inherit=True)


GUIDE_CONTEXT = '''
"""What the guide's examples take from the code around them."""

import json
from datetime import timedelta
from typing import Annotated, Any

import anyio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from alembic import context
from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import BaseModel
from sqlalchemy import JSON as SQLJSON
from sqlalchemy import Connection, MetaData
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import idembarrier
from idembarrier import Barrier, ExpiredReplay, Retention, UnitOfWork
from idembarrier.asgi import HTTPResponseCodec, RequestHead
from idembarrier.kafka import AIOKafkaPublisher, DeadLetterTopic, OutboxRelay, run_consumer


class Base(DeclarativeBase):
    pass


class Payment(Base):
    __tablename__ = "payments"
    id: Mapped[int] = mapped_column(primary_key=True)
    amount: Mapped[int] = mapped_column(default=0)
    charge_id: Mapped[str] = mapped_column(default="")


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    item: Mapped[str]


class Invoice(Base):
    __tablename__ = "invoices"
    id: Mapped[int] = mapped_column(primary_key=True)
    order: Mapped[Any] = mapped_column(SQLJSON)


class PaymentIn(BaseModel):
    amount: int


class OrderIn(BaseModel):
    item: str


class Charge:
    id: str


class Gateway:
    async def charge(self, body: object, *, idempotency_key: str) -> Charge:
        raise NotImplementedError


sessionmaker: async_sessionmaker[AsyncSession] = async_sessionmaker()
barrier: Barrier = Barrier(sessionmaker)
gateway = Gateway()
key = "order-42"
body: dict[str, Any] = {"amount": 4200}
connection: Connection
target_metadata = MetaData()
DIRECT_URL = "postgresql+asyncpg://app@db-direct/shop"
POOLED_URL = "postgresql+asyncpg://app@pgbouncer:6432/shop"
NEW_KEY = OLD_KEY = b"a Fernet key: SealedCodec.new_key()"


async def serve() -> None:
    raise NotImplementedError


class User:
    tenant_id: str


def current_user() -> User:
    raise NotImplementedError


def tenant_of(request: RequestHead) -> str:
    raise NotImplementedError


async def verify_stripe_signature(request: Request) -> None:
    raise NotImplementedError


app = FastAPI()
'''

MYPY_CONFIG = """
[mypy]
python_version = 3.11
check_untyped_defs = True
strict_equality = True
warn_unused_ignores = True
warn_redundant_casts = True

[mypy-aiokafka.*]
ignore_missing_imports = True
"""


_HEADER = "# {where}\nfrom guide_context import *  # noqa: F403\n\n"
_BODY_START = _HEADER.count("\n") + 2  # the module line of a block's first line: after the header and the def
_ERROR = re.compile(r"^(example_\d+)\.py:(\d+)(?::\d+)?: error: (.*?)  \[([\w-]+)\]$", re.MULTILINE)

KNOWN_TYPE_ERRORS = {
    # (page, a piece of the line, mypy's error code): why the example does not type-check as written.
    ("README.md", "return uow.response", "return-value"): (
        "`uow.response` is the codec's `JSON` union, and the quickstart's handler is annotated `-> dict`"
    ),
    ("docs/leases.md", 'lease.checkpoint_data["charge_id"]', "index"): (
        "`Lease.checkpoint_data` is `JSON`, a union that includes types which cannot be indexed by a string"
    ),
    ("docs/leases.md", 'lease.checkpoint_data["charge_id"]', "call-overload"): "the same, for `list`",
    ("docs/http.md", 'request.scope["user"].tenant_id', "attr-defined"): (
        "`RequestHead.scope` holds `object` values, so the user your authentication put there has no attributes"
    ),
}
"""The examples' own type errors, pinned: the test fails on any other error, and on a pinned one that is gone."""


@pytest.mark.timeout(600)  # a cold mypy cache reads SQLAlchemy, FastAPI and pydantic
def test_examples_type_check(tmp_path: Path) -> None:
    """mypy finds no error in any example beyond the pinned ones, each checked in the context the guide assumes."""
    (tmp_path / "guide_context.py").write_text(GUIDE_CONTEXT)
    (tmp_path / "mypy.ini").write_text(MYPY_CONFIG)
    blocks: dict[str, tuple[str, str]] = {}  # generated module → (page:line, code)
    for number, example in enumerate(EXAMPLES):
        code, where = (str(value) for value in example.values)
        (tmp_path / f"example_{number}.py").write_text(_HEADER.format(where=where) + as_async_body(code))
        blocks[f"example_{number}"] = (where, code)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(tmp_path / "mypy.ini"),
            "--cache-dir",
            str(ROOT / ".mypy_cache" / "guide"),
            *(f"{module}.py" for module in sorted(blocks)),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode in {0, 1}, result.stdout + result.stderr  # 1: type errors; anything else: a crash
    unexpected, seen = [], set()
    for module, line, message, code in _ERROR.findall(result.stdout):
        where, block = blocks[module]
        page, first = where.rsplit(":", 1)
        index = int(line) - _BODY_START
        text = block.splitlines()[index]
        known = [entry for entry in KNOWN_TYPE_ERRORS if entry[0] == page and entry[1] in text and entry[2] == code]
        seen.update(known)
        if not known:
            unexpected.append(f"{page}:{int(first) + index}: {message} [{code}]\n    {text.strip()}")
    assert unexpected == [], "\n".join(unexpected)
    assert seen == set(KNOWN_TYPE_ERRORS), f"fixed, so no longer pinned: {set(KNOWN_TYPE_ERRORS) - seen}"
    assert result.returncode == (1 if KNOWN_TYPE_ERRORS else 0), result.stdout


# -- the layer diagram ---------------------------------------------------------------------------------

_MODULE = re.compile(r"idembarrier\.\w+|\b_\w+\.py\b")


def diagram(text: str) -> str:
    """The layer diagram: the first ```text block after the page's or section's "Architecture" heading."""
    section = re.split(r"^#+ Architecture\n", text, maxsplit=1, flags=re.MULTILINE)[1]
    return fenced_blocks(section, "text")[0][1]


def layers(drawing: str) -> list[tuple[str, list[str]]]:
    """Each layer of the diagram, top first: its name and the modules it names (``idembarrier.x``, ``_y.py``)."""
    found = []
    for line in drawing.splitlines():
        if line[:1].isalpha():  # a layer's line; the others are its arrows and notes
            name = re.split(r"\s{2,}", line, maxsplit=1)[0]
            modules = [m if m.startswith("idembarrier.") else f"idembarrier.{m[:-3]}" for m in _MODULE.findall(line)]
            found.append((name, modules))
    return found


def source_files(module: str) -> list[Path]:
    """The files of ``module``: a package's every module, or one file."""
    path = PACKAGE.joinpath(*module.split(".")[1:])
    return sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]


def run_time_imports(path: Path) -> set[str]:
    """The idembarrier modules ``path`` imports when it runs (not those imported under ``TYPE_CHECKING``)."""
    # The package a relative import starts from: the module's own (for __init__.py, the package itself).
    package = ["idembarrier", *path.relative_to(PACKAGE).parts[:-1]]
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in {"TYPE_CHECKING", "typing.TYPE_CHECKING"}:
            node.body = []
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join([*base, *([node.module] if node.module else [])])
            imported.add(name)
            imported.update(f"{name}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    return {name for name in imported if name.startswith("idembarrier")}


def layer_of(module: str, drawn: list[tuple[str, list[str]]]) -> int | None:
    """The index of the layer that draws ``module`` (or the package it is in); None if none does."""
    for index, (_, modules) in enumerate(drawn):
        if any(module == m or module.startswith(f"{m}.") for m in modules):
            return index
    return None


def test_readme_shows_the_architecture_pages_diagram() -> None:
    """The README's architecture section shows the very diagram of docs/architecture.md."""
    assert diagram(README.read_text()) == diagram(ARCHITECTURE.read_text())


def test_diagram_names_modules_that_exist() -> None:
    """Every module the diagram names is in the package, and the diagram has its seven layers."""
    drawn = layers(diagram(ARCHITECTURE.read_text()))
    assert [name for name, _ in drawn] == [
        "integrations",
        "façade",
        "work",
        "decision",
        "collaborators",
        "dialect seam",
        "errors",
    ]
    for _, modules in drawn:
        assert modules
        for module in modules:
            assert all(path.exists() for path in source_files(module)), module


def test_no_layer_imports_a_layer_above_it() -> None:
    """Each module imports, when it runs, only modules of its own layer or below (or off the diagram)."""
    drawn = layers(diagram(ARCHITECTURE.read_text()))
    upward = []
    for index, (_, modules) in enumerate(drawn):
        for module in modules:
            for path in source_files(module):
                for imported in run_time_imports(path):
                    above = layer_of(imported, drawn)
                    if above is not None and above < index:
                        upward.append(f"{path.relative_to(ROOT)} imports {imported} ({drawn[above][0]})")
    assert upward == []


def test_import_reader_resolves_relative_imports_and_skips_type_checking() -> None:
    """The import reader resolves relative imports, skips those under TYPE_CHECKING, and places modules."""
    module = PACKAGE / "_claim.py"
    imports = run_time_imports(module)
    assert "idembarrier._record" in imports
    assert "idembarrier._record.Status" in imports
    assert not any(name.startswith("idembarrier._record.Record") for name in imports)  # TYPE_CHECKING only
    drawn = layers(diagram(ARCHITECTURE.read_text()))
    assert layer_of("idembarrier.asgi._middleware", drawn) == 0
    assert layer_of("idembarrier._barrier", drawn) == 1
    assert layer_of("idembarrier._record", drawn) is None
