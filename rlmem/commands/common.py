"""Argument groups, errors and loaders shared by several subcommands."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

from rlmem.dtypes import LEARNER_DTYPES


class CommandError(Exception):
    """A user error (bad flag, file or record): ``rlmem`` prints ``error: <message>`` and exits 2."""


# --dtype of commands that replay or load the learner's model (rlmem.dtypes, the one table)
DTYPE_CHOICES = list(LEARNER_DTYPES)


def as_flags(message: str, section: str) -> str:
    """Rewrite ``section.field_name`` in a config error as the CLI flag ``--field-name`` the user typed."""
    return re.sub(rf"\b{section}\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), message)


def at_least(low: int | float, kind: type = int):
    """An argparse ``type`` that refuses values below ``low``: ``--batch 0`` is then argparse's
    one ``error: argument --batch: ...`` line (exit 2) before anything starts, never a silent
    default, a ZeroDivisionError or an empty benchmark."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") \
                from None
        if not value >= low:   # also refuses a float NaN
            raise argparse.ArgumentTypeError(f"must be >= {low} (got {text})")
        return value
    parse.__name__ = kind.__name__   # argparse names the type in its own messages
    return parse


def above_zero(text: str) -> float:
    """An argparse ``type`` for a number that must be > 0 (a timeout)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0 (got {text})")
    return value


def add_eviction_args(p: argparse.ArgumentParser, *, defaults: dict | None = None,
                      exclude: tuple[str, ...] = ()) -> None:
    """One flag per :class:`EvictionConfig` field, with its default and help (the one definition).

    ``defaults`` overrides some defaults on purpose (a benchmark sized for a tiny model); the help
    then shows the value that applies. ``exclude`` leaves out fields a command sets otherwise
    (``rlmem eval``: ``eps`` and ``scorer`` come from ``--eps`` and ``--methods``).
    """
    from rlmem.eviction.policy import EvictionConfig, eviction_field_help
    from rlmem.eviction.scorers import get_scorer, scorer_names

    g = p.add_argument_group("eviction (docs/design.md section 1)")
    for f in dataclasses.fields(EvictionConfig):
        if f.name in exclude:
            continue
        default = (defaults or {}).get(f.name, f.default)
        kwargs: dict = {"default": default, "metavar": f.name.upper(),
                        "help": f"{eviction_field_help(f.name)} (default {default})"}
        if f.name == "score_transform":
            kwargs.update(choices=["log", "linear"], metavar=None)
        elif f.name == "scorer":
            kwargs.update(choices=scorer_names(), metavar=None)
        elif f.name == "scorer_args":   # a mapping: one repeatable --scorer-arg KEY=VALUE
            settings = "; ".join(f"{n}: {', '.join(f'{k}={v}' for k, v in get_scorer(n).settings().items())}"
                                 for n in scorer_names() if get_scorer(n).settings())
            g.add_argument("--scorer-arg", dest="eviction_scorer_args", action="append", default=[],
                           metavar="KEY=VALUE", help=f"{eviction_field_help(f.name)}; repeatable (default "
                           f"{default}). Each scorer's settings and their defaults: {settings}")
            continue
        else:
            kwargs["type"] = type(f.default)
        g.add_argument("--" + f.name.replace("_", "-"), dest=f"eviction_{f.name}", **kwargs)


def eviction_from_args(args: argparse.Namespace, **fixed):
    """The :class:`EvictionConfig` of the flags; ``fixed`` gives the fields left out of them."""
    from rlmem.eviction.policy import EVICTION_FIELDS, EvictionConfig

    values = {k: fixed[k] if k in fixed else getattr(args, f"eviction_{k}") for k in EVICTION_FIELDS}
    if "scorer_args" not in fixed:
        values["scorer_args"] = parse_key_values(values["scorer_args"], "--scorer-arg")
    try:
        return EvictionConfig(**values)
    except ValueError as e:
        raise CommandError(as_flags(str(e), "eviction").replace("--scorer-args", "--scorer-arg")) from None


def parse_key_values(items: list[str], flag: str) -> dict[str, str]:
    """``["sinks=8"]`` -> ``{"sinks": "8"}`` (the values are typed by whoever declares the keys)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CommandError(f"{flag} {item!r}: expected KEY=VALUE")
        if key.strip() in out:
            raise CommandError(f"{flag} {key.strip()}: given twice")
        out[key.strip()] = value.strip()
    return out


def add_sampling_args(p: argparse.ArgumentParser, *, defaults: dict | None = None, greedy: bool = False) -> None:
    """One flag per :class:`~rlmem.engine.sampling.SamplingParams` field (``SAMPLING_FIELDS``), with
    its help (the one definition); ``defaults`` overrides some defaults on purpose (evaluation's),
    ``greedy`` documents ``--temperature 0`` (greedy decoding) for commands that allow it."""
    from rlmem.engine.sampling import SAMPLING_FIELDS, SamplingParams, sampling_field_help

    g = p.add_argument_group("sampling")
    own = SamplingParams()
    for name in SAMPLING_FIELDS:
        default = (defaults or {}).get(name, getattr(own, name))
        help_ = sampling_field_help(name)
        if name == "temperature" and greedy:
            help_ += "; 0: greedy decoding (top-1)"
        kwargs: dict = {"dest": f"sampling_{name}", "help": f"{help_} (default {default})"}
        if name == "stop":
            kwargs.update(action="append", default=None, metavar="STR")
            kwargs["help"] = f"{help_} (default {default or 'none'})"
            p.set_defaults(**{f"sampling_{name}_default": list(default)})
        else:
            kwargs.update(type=type(getattr(own, name)), default=default, metavar=name.upper())
        g.add_argument("--" + name.replace("_", "-"), **kwargs)


def sampling_from_args(args: argparse.Namespace) -> dict:
    """The SamplingParams fields of the flags (``--stop`` given: those strings, else the default)."""
    from rlmem.engine.sampling import SAMPLING_FIELDS

    out = {k: getattr(args, f"sampling_{k}") for k in SAMPLING_FIELDS}
    if out["stop"] is None:
        out["stop"] = list(getattr(args, "sampling_stop_default", []))
    return out


def add_backend_arg(p: argparse.ArgumentParser) -> None:
    from rlmem.engine.registry import engine_names

    p.add_argument("--backend", default="torch", choices=engine_names(),
                   help="rollout engine (default torch, the reference engine)")


def model_error(flag: str, e: Exception) -> CommandError:
    """A loader's ``model DIR: why`` as ``--model DIR: why`` (the flag, not the word twice)."""
    text = str(e)
    return CommandError(f"{flag} {text[len('model '):] if text.startswith('model ') else text}")


def load_model(path: str, dtype: str = "float32"):
    """Model and tokenizer from a local directory; a clear :class:`CommandError` otherwise."""
    from rlmem.models.loading import ModelLoadError, load_model_and_tokenizer

    try:
        return load_model_and_tokenizer(path, dtype)
    except ModelLoadError as e:
        raise model_error("--model", e) from None


def create_engine(backend: str, model_path: str, dtype: str = "float32", seed: int = 0):
    """An engine from the registry, with registry and loading errors as :class:`CommandError`."""
    from rlmem.engine.registry import create_engine as make
    from rlmem.models.loading import ModelLoadError

    try:
        return make(backend, model_path, dtype=dtype, seed=seed)
    except ModelLoadError as e:
        raise model_error("--model", e) from None
    except ValueError as e:
        raise CommandError(f"--backend {backend}: {e}") from None


def check_backend(backend: str, cfg) -> None:
    """The engine's own refusals of the eviction settings, before anything loads or starts: the
    vLLM engine's block size, ``protect_recent`` and step-observing scorers (it would otherwise
    refuse them only in its first ``generate``, after start-up and with a progress bar open)."""
    if backend != "vllm" or cfg is None or not cfg.enabled:
        return
    from rlmem.engine.registry import engine_unavailable_reason

    why = engine_unavailable_reason("vllm")
    if why is not None:
        raise CommandError(f"--backend vllm: {why}")
    from rlmem.engine.vllm.engine import check_block_size, check_eviction, cuda_present

    try:
        check_block_size(cfg.block_size, cuda=cuda_present())
        check_eviction(cfg, None)
    except ValueError as e:
        raise CommandError(f"--backend vllm: {as_flags(str(e), 'eviction')}") from None


def output_file(path: str, flag: str = "--out"):
    """Check an output file's path before any work: not a directory, and its folder exists or can
    be created (the first existing ancestor is a writable directory). Returns it as a Path."""
    import os

    out = Path(path)
    if out.is_dir():
        raise CommandError(f"{flag} {path}: is a directory; give a file name (e.g. {out / 'records.jsonl'})")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CommandError(f"{flag} {path}: cannot create its directory: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CommandError(f"{flag} {path}: cannot write into {parent}: permission denied")
    return out


def lock_output_file(out: Path, flag: str = "--out"):
    """Create ``out``'s folder and hold a lock on ``out`` (``.<name>.lock`` beside it, the run
    directory's :class:`~rlmem.dirlock.DirLock`: a second process writing the same file is refused,
    naming the holder). Release it when the file is written."""
    from rlmem.dirlock import DirLock

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CommandError(f"{flag} {out}: cannot create its directory: {e.strerror or e}") from None
    lock = DirLock(out.parent, error=lambda msg: CommandError(f"{flag} {out}: {msg.removeprefix(f'{out.parent} ')}"),
                   what="process", other=f"choose another {flag}")
    lock.path = out.parent / f".{out.name}.lock"   # one lock per output file, not per folder
    lock.acquire()
    return lock


def check_fits(model_path: str, prompts: list[list[int]], max_new_tokens: int, prompts_file: str) -> None:
    """The longest prompt plus ``--max-new-tokens`` within the model's ``max_position_embeddings``
    (its config.json, read without loading the weights), before the model loads; a GGUF file or a
    config without the field is left to the engine's own check."""
    from rlmem.models.hf_config import max_positions

    cfg_file = Path(model_path) / "config.json"
    limit = max_positions(model_path)
    if limit is None or not prompts:
        return
    i, longest = max(enumerate(prompts), key=lambda x: len(x[1]))
    if len(longest) + max_new_tokens > limit:
        raise CommandError(f"--max-new-tokens {max_new_tokens}: prompt {i + 1} of {prompts_file} has {len(longest)} "
                           f"tokens, and {len(longest)} + {max_new_tokens} exceeds the model's "
                           f"max_position_embeddings ({limit}, {cfg_file})")


def generate(engine, prompts: list[list[int]], sampling, cfg, *, greedy_evictions: bool = False) -> list:
    """``engine.generate`` for a command: a setting the engine refuses (a vLLM block size, a prompt
    longer than the model's positions) becomes one ``error:`` line naming the backend."""
    try:
        return engine.generate(prompts, sampling, cfg if cfg is not None and cfg.enabled else None,
                               greedy_evictions=greedy_evictions)
    except ValueError as e:
        raise CommandError(f"--backend {engine.name}: {e}") from None


def read_prompts(path: str, tokenizer) -> list[tuple[str, list[int]]]:
    """Prompts file: one JSON object per line with ``prompt`` (raw text) or ``messages`` (chat template)."""
    if Path(path).is_dir():
        raise CommandError(f"--prompts {path}: is a directory, not a JSONL file")
    if not Path(path).is_file():
        raise CommandError(f"--prompts {path}: file not found")
    from rlmem.jsonl import read_json_lines

    out = []
    for where, obj in read_json_lines(path, CommandError):
        if "messages" in obj:
            msgs = obj["messages"]
            if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
                raise CommandError(f"{where}: messages: expected a list of {{'role', 'content'}} objects")
            if not getattr(tokenizer, "chat_template", None):
                raise CommandError(f"{where}: messages given but the tokenizer has no chat template")
            text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        elif isinstance(obj.get("prompt"), str):
            text = obj["prompt"]
        else:
            raise CommandError(f"{where}: expected a string field 'prompt' or a 'messages' list")
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if not ids:
            raise CommandError(f"{where}: prompt is empty after tokenization")
        out.append((text, ids))
    if not out:
        raise CommandError(f"--prompts {path}: no prompts in file")
    return out


def read_records(path: str) -> list:
    """Rollout records from a JSONL file; a missing, damaged or empty file is one :class:`CommandError`."""
    from rlmem.eviction.record import RecordError, read_jsonl

    try:
        records = read_jsonl(path)
    except (RecordError, FileNotFoundError) as e:
        raise CommandError(str(e)) from None
    if not records:
        raise CommandError(f"{path}: no records in file")
    return records
