"""Facts read from a model folder's ``config.json`` without loading its weights (or torch), so that
commands and config checks can refuse a setting before anything heavy starts."""

from __future__ import annotations

import json
from pathlib import Path


def max_positions(model: str) -> int | None:
    """``max_position_embeddings`` of a model folder's ``config.json`` (read without the weights;
    ``None`` when absent or for a ``.gguf``, whose engine check still applies at generation)."""
    cfg = Path(model).expanduser() / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    text = data.get("text_config") if isinstance(data.get("text_config"), dict) else data
    v = text.get("max_position_embeddings", data.get("max_position_embeddings"))
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None
