"""Loading a run config: YAML (duplicate keys refused), dotted overrides, schema validation, checks.

:func:`load_config` raises one :class:`ConfigError` that lists *every* problem with its dotted key
(unknown keys get a did-you-mean). Nothing heavy is imported: a bad config fails in well under a
second, long before Ray, vLLM or DeepSpeed start.
"""

from __future__ import annotations

import difflib
import os
import re
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from rlmem.run.config.checks import check_config
from rlmem.run.config.schema import RunConfig


class ConfigError(ValueError):
    """Every problem of a config at once; each line names its dotted key (``algorithm.clip_eps: ...``)."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        self.source = source
        head = f"invalid config {source}" if source else "invalid config"
        lines = [f"{head} ({len(problems)} problem{'s' if len(problems) != 1 else ''}):"]
        lines += [f"  - {key}: {msg}" if key else f"  - {msg}" for key, msg in problems]
        super().__init__("\n".join(lines))


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: str, first: int, second: int):
        super().__init__(f"key {key!r} appears twice (lines {first} and {second}); keep one")
        self.key = key


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (PyYAML silently keeps the last)."""


def _construct_mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise DuplicateKeyError(str(key), seen[key], line)
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), *,
                check_files: bool = True) -> RunConfig:
    """Read ``path`` (YAML), apply dotted ``overrides`` (``key.sub=value``, value parsed as YAML),
    validate, and run :func:`check_config`. Raises one :class:`ConfigError` listing every problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([("", f"config file not found: {p}" if not p.exists() else f"not a file: {p}")], str(p))
    text = p.read_text()
    try:
        data = yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except DuplicateKeyError as e:
        raise ConfigError([("", f"duplicate key: {e}")], str(p)) from None
    except yaml.YAMLError as e:
        hint = ""
        if re.search(r":\s*tiny:\s*(#|$)", text, re.M):
            hint = ' (model.path: write "tiny:" in quotes; unquoted it is YAML syntax)'
        raise ConfigError([("", f"YAML syntax error{hint}: {e}")], str(p)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([("", f"the top level must be a mapping of sections, got {type(data).__name__}")], str(p))
    return config_from_dict(data, overrides, check_files=check_files, source=str(p))


def config_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), *,
                     check_files: bool = True, source: str | None = None) -> RunConfig:
    """Like :func:`load_config` for an already-parsed mapping (tests, notebooks, the driver)."""
    problems: list[tuple[str, str]] = []
    data = _deep_copy(data)
    for ov in overrides:
        problems += apply_override(data, ov)
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        problems += pydantic_problems(e)
        raise ConfigError(problems, source) from None
    problems += check_config(cfg, check_files=check_files, source=source)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def parse_override_value(raw: str) -> Any:
    """A YAML scalar, or a flow list/mapping when it starts with ``[``/``{``; otherwise the raw text.

    So ``model.path=tiny:`` stays the string ``"tiny:"`` instead of becoming the mapping ``{tiny: null}``.
    """
    try:
        v = yaml.load(raw, Loader=StrictLoader)  # noqa: S506
    except yaml.YAMLError:
        return raw
    if isinstance(v, (dict, list)) and not raw.lstrip().startswith(("[", "{")):
        return raw
    return v


def apply_override(data: dict[str, Any], override: str) -> list[tuple[str, str]]:
    """Set ``data[a][b][c] = value`` for ``a.b.c=value`` in place; return problems (never raises)."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        return [(key or override, f"override {override!r} must look like dotted.key=value")]
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            where = ".".join(parts[: i + 1])
            return [(key, f"cannot set a sub-key: {where} is a {type(nxt).__name__}, not a section")]
        node = nxt
    node[parts[-1]] = parse_override_value(raw)
    return []


def pydantic_problems(e: ValidationError) -> list[tuple[str, str]]:
    out = []
    for err in e.errors(include_url=False):
        loc = [str(x) for x in err["loc"]]
        key = ".".join(loc)
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            hint = _did_you_mean(err["loc"])
            if hint:
                msg += f"; did you mean {hint!r}?"
            else:
                known = _known_fields(err["loc"][:-1])
                if known:
                    msg += f"; known keys here: {', '.join(known)}"
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = f"{err['msg']} (got {err.get('input')!r})"
        out.append((key, msg))
    return out


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: Any = RunConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        model = _unwrap_model(field.annotation)
        if model is None:
            return None
    return model


def _unwrap_model(tp: Any) -> type[BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    if get_origin(tp) in (Union, types.UnionType, list):
        for arg in get_args(tp):
            m = _unwrap_model(arg)
            if m is not None:
                return m
    return None


def _known_fields(parent: tuple) -> list[str]:
    model = _model_at(parent)
    return list(model.model_fields) if model is not None else []


def _did_you_mean(loc: tuple) -> str | None:
    name = str(loc[-1])
    known = _known_fields(tuple(loc[:-1]))
    match = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if match:
        prefix = ".".join(str(x) for x in loc[:-1])
        return f"{prefix}.{match[0]}" if prefix else match[0]
    # A key put in the wrong section: look for it one level down in every section.
    hits = []
    if len(loc) == 1:
        for sec, field in RunConfig.model_fields.items():
            sub = _unwrap_model(field.annotation)
            if sub is not None and name in sub.model_fields:
                hits.append(f"{sec}.{name}")
    return hits[0] if len(hits) == 1 else None


def _deep_copy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _deep_copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deep_copy(v) for v in x]
    return x
