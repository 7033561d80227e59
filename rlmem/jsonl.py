"""The one JSON-lines reader: rollout records, prompt and task files, datasets, run logs, eval stores.

Every JSONL file rlmem reads goes through :func:`iter_json_lines`, so every bad file gets the same
one-line error naming the file and line: a line that is not JSON, bytes that are not UTF-8, a line
that is not a JSON object, an empty file where one is not allowed. Callers pass the exception type
their command turns into a user error (``RecordError``, ``CommandError``, ...).
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Literal

Torn = Literal["error", "tail", "skip"]
_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


def _lines(f) -> Iterator[tuple[int, bytes, bool]]:
    """``(line number, bytes without the newline, is it the last line)``, streamed (records files are large)."""
    prev = None
    for lineno, raw in enumerate(f, 1):
        if prev is not None:
            yield lineno - 1, prev, False
        prev = raw[:-1] if raw.endswith(b"\n") else raw
    if prev is not None:
        yield lineno, prev, True


def iter_json_lines(path: str | os.PathLike, error: type[Exception] = ValueError, *, objects: bool = True,
                    torn: Torn = "error", empty: str | None = None) -> Iterator[tuple[str, object]]:
    """Yield ``(where, obj)`` for each non-blank line, ``where`` being ``"path:line"`` (1-based).

    Raises ``error`` naming the file and line for a line that is not valid JSON (with its column),
    for bytes that are not UTF-8, and (``objects``, the default) for a line that is not a JSON
    object. ``torn`` says what an unparseable line means: ``"error"``; ``"tail"``, skip it when it is
    the last line (an append-only log torn by a crash mid-write), else error; ``"skip"``, skip it
    anywhere. ``empty``: when given (e.g. ``"records"``), a file without a single line raises
    ``"<path>: no <empty> in file"``. A missing file raises ``error`` ``"<path>: file not found"``.
    A UTF-8 byte-order mark on the first line is ignored.
    """
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a JSON-lines file") from None
    n = 0
    with f:
        for lineno, raw, is_last in _lines(f):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                if torn == "skip" or (torn == "tail" and is_last):
                    continue
                raise error(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                            "JSON lines must be UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                if torn == "skip" or (torn == "tail" and is_last):
                    continue
                raise error(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if objects and not isinstance(obj, dict):
                raise error(f"{where}: expected a JSON object, got {_JSON_TYPES.get(type(obj), type(obj).__name__)}: "
                            f"{line.strip()[:40]}")
            n += 1
            yield where, obj
    if empty is not None and n == 0:
        raise error(f"{path}: no {empty} in file")


def read_json_lines(path: str | os.PathLike, error: type[Exception] = ValueError, *, objects: bool = True,
                    torn: Torn = "error", empty: str | None = None) -> list[tuple[str, object]]:
    """:func:`iter_json_lines` as a list (the file is checked whole before anything uses it)."""
    return list(iter_json_lines(path, error, objects=objects, torn=torn, empty=empty))
