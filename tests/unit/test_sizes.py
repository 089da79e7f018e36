"""crew's modules and functions stay short enough to read at once (issue 15): a module over
:data:`MODULE_LINES` lines or a function over :data:`FUNCTION_LINES` (its docstring
included) must say why in a comment, ``# longer than N lines because ...``, near its top
(a module's within its first 40 lines; a function's just above its ``def`` or inside it)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

CREW = Path(__file__).resolve().parents[2] / "crew"
MODULE_LINES = 300
FUNCTION_LINES = 40
_REASON = re.compile(r"#\s*longer than \d+ lines because \S", re.IGNORECASE)


def too_long(source: str, name: str) -> list[str]:
    """The module and the functions of ``source`` that are too long and do not say why."""
    lines = source.splitlines()
    problems = []
    if len(lines) > MODULE_LINES and not any(map(_REASON.search, lines[:40])):
        problems.append(f"{name}: {len(lines)} lines")
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
        said = lines[max(0, first - 3):node.end_lineno]
        if length > FUNCTION_LINES and not any(map(_REASON.search, said)):
            problems.append(f"{name}:{node.lineno} {node.name}(): {length} lines")
    return problems


def test_modules_and_functions_are_short_or_say_why():
    problems = [problem for path in sorted(CREW.rglob("*.py"))
                for problem in too_long(path.read_text(), str(path.relative_to(CREW.parent)))]
    assert problems == []


def test_a_long_function_without_a_reason_is_caught_and_one_with_a_reason_passes():
    body = "".join(f"    x{n} = {n}\n" for n in range(FUNCTION_LINES))
    assert too_long(f"def f():\n{body}", "m") == [f"m:1 f(): {FUNCTION_LINES + 1} lines"]
    assert too_long(f"# longer than 40 lines because it is a table\ndef f():\n{body}",
                    "m") == []


def test_a_long_module_without_a_reason_is_caught():
    source = "x = 1\n" * (MODULE_LINES + 1)
    assert too_long(source, "m") == [f"m: {MODULE_LINES + 1} lines"]
    assert too_long("# longer than 300 lines because it is a table\n" + source, "m") == []
