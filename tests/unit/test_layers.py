"""crew's modules form a stack: each imports only modules below it (README, "How crew is built").

Every import counts: at module level, under ``TYPE_CHECKING`` and inside functions, since
any of them makes a cycle that the next change trips over. A new module must be placed in
:data:`LAYERS`, which is the README's layer list, bottom first.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

CREW = Path(__file__).resolve().parents[2] / "crew"
README = CREW.parent / "README.md"

#: Bottom first; a module may import only the modules before it.
LAYERS = [
    "crew.exceptions", "crew.protocol", "crew.validation", "crew.outcomes", "crew.settings",
    "crew.threads", "crew.loops", "crew.budget", "crew.memory", "crew.tables", "crew.wire",
    "crew.codec", "crew.frames", "crew.seam", "crew.transport", "crew.failures", "crew.amqp",
    "crew.connecting", "crew.registry", "crew.cancels", "crew.jobs", "crew.metrics",
    "crew.tracing", "crew.figures", "crew.observing", "crew.context", "crew.pool", "crew.replies",
    "crew.intake", "crew.calls", "crew.presence", "crew.session", "crew.serving",
    "crew.pubsub", "crew.pending", "crew.parallel", "crew.link", "crew.client",
    "crew.synccall", "crew.loopthread", "crew.syncruntime", "crew.sync",
    "crew.supervisor", "crew.cli", "crew.census", "crew.windows", "crew.board",
    "crew.watcher", "crew.httpapi", "crew.dashboard", "crew.gateway", "crew.worker", "crew.master",
    "crew.master.tornado", "crew.calling", "crew.command", "crew",
    "crew.__main__", "crew.testbroker", "crew.mocktask", "crew.testclient", "crew.testing",
]


def module_name(path: Path) -> str:
    parts = path.relative_to(CREW.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def crew_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(CREW.rglob("*.py"))}


def imported_modules(source: str, name: str, is_package: bool, known: set[str]) -> set[str]:
    """The crew modules that ``source`` (the module ``name``) imports, anywhere in it."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from . import codec`` names modules; ``from .amqp import Channel`` names one.
            modules = {f"{base}.{alias.name}" for alias in node.names} & known
            found.update(modules or {base})
    return {module for module in found if module in known}


def upward_imports(layers: list[str], sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Every import of a module that is not below the importer, as readable lines."""
    rank = {name: index for index, name in enumerate(layers)}
    known = set(sources)
    problems = [f"{name} is not in LAYERS" for name in sources if name not in rank]
    for name, (source, is_package) in sources.items():
        for target in sorted(imported_modules(source, name, is_package, known)):
            if target != name and rank.get(target, -1) >= rank.get(name, -1):
                problems.append(f"{name} imports {target}, which is not below it")
    return problems


def test_every_import_points_down():
    sources = {name: (path.read_text(), path.name == "__init__.py")
               for name, path in crew_modules().items()}
    assert upward_imports(LAYERS, sources) == []


def test_layers_name_only_modules_that_exist():
    assert sorted(set(LAYERS) - set(crew_modules())) == []


@pytest.mark.parametrize("source", [
    "from .worker import Worker",
    "from crew.worker import Worker",
    "import crew.worker",
    "from . import worker",
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .worker import Worker",
    "def f():\n    from .worker import Worker",
])
def test_an_upward_import_of_any_kind_is_caught(source):
    sources = {"crew.jobs": (source, False), "crew.worker": ("", False)}
    assert upward_imports(["crew.jobs", "crew.worker"], sources) == [
        "crew.jobs imports crew.worker, which is not below it"]


def test_a_relative_import_from_a_subpackage_is_resolved():
    sources = {"crew.client": ("", False),
               "crew.master.tornado": ("from ..client import Client", False)}
    assert upward_imports(["crew.master.tornado", "crew.client"], sources) == [
        "crew.master.tornado imports crew.client, which is not below it"]
    assert upward_imports(["crew.client", "crew.master.tornado"], sources) == []


def test_a_module_missing_from_the_layers_is_caught():
    assert upward_imports([], {"crew.new": ("", False)}) == ["crew.new is not in LAYERS"]


def test_the_readme_lists_the_same_layers():
    """README's "How crew is built" lists every module, bottom first, one per item
    (``- `crew/x.py`: ...``)."""
    text = README.read_text()
    section = text.split("## How crew is built", 1)[1].split("\n## ", 1)[0]
    listed = [module_name(CREW.parent / path) for path in
              re.findall(r"^- `(crew/[\w/]+\.py)`", section, re.MULTILINE)]
    assert listed == [name for name in LAYERS if crew_modules()[name].name != "__init__.py"]
