"""Reading JSON-lines files with errors that name the file and line (records, prompts, datasets)."""

from __future__ import annotations

import json
import os
from typing import Iterator


def iter_json_lines(path: str | os.PathLike, error: type[Exception] = ValueError) -> Iterator[tuple[str, object]]:
    """Yield ``(where, obj)`` for each non-blank line, ``where`` being ``"path:line"``.

    A line that is not valid JSON raises ``error`` naming the file, line and column.
    """
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield where, obj
