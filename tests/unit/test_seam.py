"""The seam to pika's internals (crew/seam.py, crew/transport.py): which path a connection
takes and why; that the public path really is pika's publish, ack, reads and decoding; that
a header pika cannot decode does not close a connection on either path, without patching
pika for the rest of the process; and that no crew module but transport.py touches a
private pika name. tests/broker/test_seam_public.py runs calls on the public path."""

from __future__ import annotations

import ast
import logging
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pika.channel
import pika.connection
import pika.data
import pika.spec
import pytest
from pika.adapters.utils import io_services_utils
from pika.spec import BasicProperties

import crew
from crew import seam, transport, wire
from crew.frames import FrameReader
from crew.transport import FrameReadingConnection, PublicConnection

CREW = Path(crew.__file__).parent


@pytest.fixture(autouse=True)
def _fresh_checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test sees the checks made anew (some break pika on purpose) and its own log,
    with the switch unset whatever the run's is."""
    monkeypatch.delenv(seam.ENV, raising=False)
    seam.codec_problem.cache_clear()
    transport._internals_problem.cache_clear()
    seam._reported.clear()
    yield
    seam.codec_problem.cache_clear()
    transport._internals_problem.cache_clear()
    seam._reported.clear()


def _choice_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "crew.seam"]


# --- the choice ----------------------------------------------------------------------------

@pytest.mark.parametrize(("switch", "expected"), [
    ("public", PublicConnection), ("fast", FrameReadingConnection),
    ("auto", FrameReadingConnection), ("", FrameReadingConnection),
    (" Public ", PublicConnection)])
def test_the_switch_chooses_the_path(switch: str, expected: type, monkeypatch, caplog) -> None:
    monkeypatch.setenv(seam.ENV, switch)
    caplog.set_level(logging.INFO, "crew.seam")
    assert transport.connection_class() is expected
    assert transport.connection_class() is expected
    lines = _choice_lines(caplog)
    assert len(lines) == 1 and ("fast" if expected is FrameReadingConnection else "public") \
        in lines[0]


def test_an_unknown_switch_value_is_refused(monkeypatch) -> None:
    monkeypatch.setenv(seam.ENV, "quick")
    with pytest.raises(ValueError, match="CREW_PIKA_PATH must be one of auto, fast, public"):
        transport.connection_class()


def test_an_untested_pika_takes_the_public_path_unless_forced(monkeypatch, caplog) -> None:
    monkeypatch.setattr(pika, "__version__", "1.99.0")
    monkeypatch.delenv(seam.ENV, raising=False)
    caplog.set_level(logging.INFO, "crew.seam")
    assert transport.connection_class() is PublicConnection
    assert transport.connection_class() is PublicConnection
    lines = _choice_lines(caplog)
    assert len(lines) == 1 and "pika 1.99.0 is not one the fast path was tested" in lines[0]
    assert caplog.records[0].levelno == logging.WARNING
    monkeypatch.setenv(seam.ENV, "fast")
    assert transport.connection_class() is FrameReadingConnection


def test_a_codec_that_differs_from_pikas_takes_the_public_path(monkeypatch, caplog) -> None:
    monkeypatch.setenv(seam.ENV, "fast")  # even when the fast path is asked for
    monkeypatch.setattr(wire, "ack_frame", lambda channel, tag: b"\x01" + bytes(20))
    assert transport.connection_class() is PublicConnection
    assert "crew.wire's ack differs from pika's" in _choice_lines(caplog)[0]


def test_a_codec_that_raises_takes_the_public_path(monkeypatch, caplog) -> None:
    def broken(*_args: Any) -> None:
        raise AttributeError("pika changed")

    monkeypatch.setattr(wire, "decode", broken)
    assert transport.connection_class() is PublicConnection
    assert "crew.wire failed" in _choice_lines(caplog)[0]


def test_pika_internals_that_behave_otherwise_take_the_public_path(monkeypatch, caplog) -> None:
    # pika still has the method, with the same signature, but it no longer writes frames
    # through the transport: a check of names alone would not see it.
    monkeypatch.setattr(pika.connection.Connection, "_output_marshaled_frames",
                        lambda self, frames: None)
    assert transport.connection_class() is PublicConnection
    assert "_output_marshaled_frames does not write" in _choice_lines(caplog)[0]


def test_a_transport_that_buffers_otherwise_takes_the_public_path(monkeypatch, caplog) -> None:
    monkeypatch.setattr(io_services_utils._AsyncPlaintextTransport, "_buffer_tx_data",
                        lambda self, data: None)
    assert transport.connection_class() is PublicConnection
    assert "does not buffer as crew expects" in _choice_lines(caplog)[0]


def test_a_missing_private_method_takes_the_public_path(monkeypatch, caplog) -> None:
    monkeypatch.delattr(pika.connection.Connection, "_process_frame")
    assert transport.connection_class() is PublicConnection
    assert "Connection._process_frame" in _choice_lines(caplog)[0]


# --- headers pika cannot decode ------------------------------------------------------------

def _hostile_header() -> bytes:
    """A content header frame with a timestamp of the year 146 138 514 283 in its headers."""
    table = b"\x01tT" + (2**62).to_bytes(8, "big") + b"\x01nF" + struct.pack(">L", 11) \
        + b"\x01uT" + (2**62).to_bytes(8, "big")
    payload = (struct.pack(">HHQH", BasicProperties.INDEX, 0, 5, BasicProperties.FLAG_HEADERS)
               + len(table).to_bytes(4, "big") + table)
    return struct.pack(">BHL", pika.spec.FRAME_HEADER, 1, len(payload)) + payload + b"\xce"


EXPECTED_HEADERS = {"t": 2**62, "n": {"u": 2**62}}


def test_the_fast_paths_reader_keeps_an_impossible_timestamp_an_int() -> None:
    _, frames = FrameReader().feed(_hostile_header())
    assert frames[0].properties.headers == EXPECTED_HEADERS


def test_the_public_paths_reads_keep_an_impossible_timestamp_an_int() -> None:
    """pika's own reads, with crew's codec asked only once pika raised."""
    got: list[Any] = []
    conn = PublicConnection.__new__(PublicConnection)
    conn._frame_buffer = b""
    conn.bytes_received = 0
    conn._process_frame = got.append
    deliver = pika.frame.Method(1, pika.spec.Basic.Deliver("c", 1, False, "", "q")).marshal()
    conn._on_data_available(deliver + _hostile_header() + pika.frame.Body(1, b"12345").marshal())
    assert [type(frame) for frame in got] == [pika.frame.Method, pika.frame.Header,
                                              pika.frame.Body]
    assert got[1].properties.headers == EXPECTED_HEADERS


def test_a_bad_header_still_raises_pikas_error_on_the_public_path() -> None:
    conn = PublicConnection.__new__(PublicConnection)
    conn._frame_buffer = b""
    conn.bytes_received = 0
    conn._process_frame = lambda frame: None
    frame = _hostile_header().replace(b"\x01tT", b"\x01tZ")  # a kind that does not exist
    with pytest.raises(pika.exceptions.InvalidFieldTypeException):
        conn._on_data_available(frame)


def test_pika_is_not_patched_for_the_rest_of_the_process() -> None:
    import crew.master.tornado
    import crew.worker  # noqa: F401  (every crew module is imported)

    assert pika.data.decode_value.__module__ == "pika.data"
    assert pika.data.decode_table.__module__ == "pika.data"
    with pytest.raises((OverflowError, OSError, ValueError)):
        pika.frame.decode_frame(_hostile_header())


# --- one module touches pika's private names -----------------------------------------------

def _modules() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(encoding="utf-8"), str(path))
            for path in sorted(CREW.rglob("*.py"))}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _defined(trees: Any) -> set[str]:
    """Every private name these modules define: functions, classes, arguments, assigned
    names and attributes, import aliases."""
    names: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.alias):
                names.add((node.asname or node.name).split(".")[0])
    return {name for name in names if _is_private(name)}


def _private_to_pika(trees: dict[Path, ast.Module]) -> set[str]:
    """The private names pika defines and crew does not define outside transport.py (a
    private name of another library, such as tornado's, is not the seam's business)."""
    pikas = Path(pika.__file__).parent.rglob("*.py")
    crews = [tree for path, tree in trees.items() if path != CREW / "transport.py"]
    return _defined(ast.parse(path.read_bytes()) for path in pikas) - _defined(crews)


def _touches(tree: ast.Module, pikas: set[str]) -> list[str]:
    """The private pika names (or ways around them) that ``tree`` uses."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if node.attr == "__dict__":
                found.append(".__dict__")
            elif node.attr == "__class__" and isinstance(node.ctx, ast.Store):
                found.append("__class__ =")
            elif node.attr in pikas:
                found.append(node.attr)
            root = node
            while isinstance(root, ast.Attribute):
                root = root.value
            if (isinstance(node.ctx, ast.Store) and isinstance(root, ast.Name)
                    and root.id == "pika"):
                found.append(f"assignment to pika.{ast.unparse(node)[5:]}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pika"):
            found += [alias.name for alias in node.names if _is_private(alias.name)]
            found += [node.module for part in node.module.split(".") if _is_private(part)]
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("pika")
                      and any(_is_private(part) for part in alias.name.split("."))]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
              and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
              and node.args[1].value in pikas):
            found.append(f"{node.func.id}(..., {node.args[1].value!r})")
    return found


def test_only_transport_touches_pikas_private_names() -> None:
    trees = _modules()
    pikas = _private_to_pika(trees)
    touching = {str(path.relative_to(CREW.parent)): names for path, tree in trees.items()
                if (names := _touches(tree, pikas))}
    assert set(touching) == {"crew/transport.py"}, touching
    # The scan sees what the seam does: a sanity check of the scan itself.
    assert {"_output_marshaled_frames", "_transport", "__class__ ="} <= \
        set(touching["crew/transport.py"])
