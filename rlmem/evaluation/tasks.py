"""Evaluation tasks: problems, their prompt text, and their grading by the project's verifiers.

``--task`` names one of:

* a registered data source: ``countdown`` (generated Countdown problems, test split, from the
  training generator's default settings; hubs are not needed), ``passkey``, ``passkey-write``
  (rlmem/data/passkey.py), ``amc23``, ``aime24``, ``aime25`` or any id/alias of
  :data:`rlmem.data.DATASETS` (loaded from the hub or its local cache);
* ``jsonl:PATH``: one problem per line with ``prompt`` (the task statement: the task's
  instruction and the model's chat template are applied, as in training) or ``messages`` (a chat,
  rendered with the chat template as is), and either ``answer`` (graded as math) or ``target`` and
  ``numbers`` (graded as Countdown). A ``reward`` field may name another registered verifier.

Each example carries a ``reward`` (a name in :mod:`rewards.registry`); grading calls it TRL-style
with the example's columns, so any registered verifier works.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlmem.data.templates import build_prompt


class TaskError(ValueError):
    """A task spec or task file that cannot be used (the message names the task, file and field)."""


@dataclass
class EvalTask:
    name: str
    examples: list[dict]


# task names of ``rlmem eval`` that differ from the data-registry source they read
TASK_SOURCES = {"countdown": "countdown-generated"}

# The --task-option keys each data source uses (rlmem/data/datasets.py: its generator's or split
# logic's keyword arguments). The sources accept any keyword and drop those they do not use, so an
# unknown or misspelt option would change nothing silently: it is refused against this table.
_COUNTDOWN_GEN = ("num_examples", "num_numbers", "number_range", "target_range", "max_tries_per_example", "drop_leaks")
_PASSKEY = ("num_examples", "filler_repeats", "write_items")
TASK_OPTIONS: dict[str, tuple[str, ...]] = {
    "countdown-generated": _COUNTDOWN_GEN,
    "passkey": _PASSKEY,
    "passkey-write": _PASSKEY,
    "Jiayi-Pan/Countdown-Tasks-3to4": ("train_size", "test_size", "drop_leaks"),
}


def task_options(source: str) -> tuple[str, ...]:
    """The --task-option keys ``source`` (a data-registry name or alias) uses; () for none."""
    from rlmem.data import DATASETS

    spec = DATASETS.get(source)
    return TASK_OPTIONS.get(spec.hub_id if spec is not None else source, ())


def check_options(spec: str, options: dict) -> None:
    """Refuse a --task-option the task does not use, naming it and listing the known ones."""
    from rlmem.data import DATASETS

    source = TASK_SOURCES.get(spec, spec)
    if not options or source not in DATASETS:
        return   # no options, or an unknown task: load_task says what is wrong with it
    known = task_options(source)
    bad = sorted(k for k in options if k not in known)
    if bad:
        raise TaskError(f"--task-option {bad[0]}: not an option of task {spec!r}; "
                        + (f"known: {', '.join(known)}" if known else "it takes none"))


def load_task(spec: str, *, split: str = "test", limit: int | None = None, seed: int = 0,
              options: dict | None = None) -> EvalTask:
    """The problems of ``spec`` (see the module docstring), the first ``limit`` of them.

    ``options`` go to the data source (e.g. ``filler_repeats`` / ``write_items`` of the pass-key
    generator, ``num_numbers`` of Countdown's); not allowed with ``jsonl:``.
    """
    from rlmem.data import DatasetError, load_examples

    options = dict(options or {})
    if spec.startswith("jsonl:"):
        if options:
            raise TaskError(f"--task {spec}: --task-option does not apply to jsonl files")
        examples = read_task_file(spec[len("jsonl:"):])
        if limit is not None:
            examples = examples[:limit]
    else:
        source = TASK_SOURCES.get(spec, spec)
        check_options(spec, options)
        try:
            examples = load_examples(source, split, limit=limit, seed=seed, **options)
        except TypeError as e:
            raise TaskError(f"--task {spec}: unsupported --task-option ({e})") from None
        except KeyError as e:
            raise TaskError(f"--task {spec}: {e.args[0]}") from None
        except (DatasetError, ValueError, RuntimeError, FileNotFoundError) as e:
            raise TaskError(f"--task {spec}: {e}") from None
    if not examples:
        raise TaskError(f"--task {spec}: no problems")
    return EvalTask(spec, examples)


def parse_options(items: list[str], flag: str = "--task-option") -> dict:
    """``["filler_repeats=6", "name=x"]`` -> ``{"filler_repeats": 6, "name": "x"}`` (JSON values, else strings)."""
    import json

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TaskError(f"{flag} {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def read_task_file(path: str) -> list[dict]:
    """Problems of a ``jsonl:`` task file; errors name the file, line and field."""
    from rewards import list_rewards
    from rlmem.jsonl import iter_json_lines

    p = Path(path)
    if p.is_dir():
        raise TaskError(f"--task jsonl:{path}: is a directory, not a JSON-lines file")
    if not p.is_file():
        raise TaskError(f"--task jsonl:{path}: file not found")
    out = []
    for where, row in iter_json_lines(p, TaskError):   # JSON objects, errors naming file:line
        ex: dict[str, Any] = {k: v for k, v in row.items()}
        ex.setdefault("id", f"{p.name}-{len(out)}")
        if "messages" in row:
            msgs = row["messages"]
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs):
                raise TaskError(f"{where}: messages: expected a non-empty list of {{'role', 'content'}} objects")
        elif not (isinstance(row.get("prompt"), str) and row["prompt"].strip()):
            if "target" in row and "numbers" in row:
                from rlmem.data.countdown import countdown_prompt_text

                ex["prompt"] = countdown_prompt_text(_int_list(row["numbers"], where, "numbers"),
                                                     _int(row["target"], where, "target"))
            else:
                raise TaskError(f"{where}: expected a text field 'prompt' or a 'messages' list")
        if "reward" in row:
            if row["reward"] not in list_rewards():
                raise TaskError(f"{where}: reward {row['reward']!r} is not a registered verifier "
                                f"({', '.join(list_rewards())})")
            ex["task"] = ex.get("task", row["reward"])
        elif "target" in row and "numbers" in row:
            ex.update(reward="countdown", task="countdown", target=_int(row["target"], where, "target"),
                      numbers=_int_list(row["numbers"], where, "numbers"))
        elif "answer" in row:
            if row["answer"] is None or str(row["answer"]).strip() == "":
                raise TaskError(f"{where}: answer is empty")
            ex.update(reward="math", task="math", answer=str(row["answer"]).strip())
        else:
            raise TaskError(f"{where}: expected 'answer' (math) or 'target' and 'numbers' (Countdown)")
        out.append(ex)
    if not out:
        raise TaskError(f"--task jsonl:{path}: no problems in file")
    return out


def _int(v: Any, where: str, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise TaskError(f"{where}: {name} must be an integer (got {v!r})")
    try:
        i = int(v)
        if float(v) != i:
            raise ValueError
    except ValueError:
        raise TaskError(f"{where}: {name} must be an integer (got {v!r})") from None
    return i


def _int_list(v: Any, where: str, name: str) -> list[int]:
    if not isinstance(v, list) or not v:
        raise TaskError(f"{where}: {name} must be a non-empty list of integers (got {v!r})")
    return [_int(x, where, name) for x in v]


def prompt_text(example: dict, tokenizer, template: str = "auto", eviction_rate: float | None = None) -> str:
    """The text fed to the model: a ``messages`` chat through the chat template as is; otherwise the
    training prompt (:func:`rlmem.data.templates.build_prompt`: task instruction + template, and the
    interoception tag when ``eviction_rate`` is given)."""
    if "messages" in example:
        if eviction_rate is not None:
            raise TaskError(f"problem {example.get('id')!r}: --interoception needs a prompt, not messages")
        if not getattr(tokenizer, "chat_template", None):
            raise TaskError(f"problem {example.get('id')!r} has messages but the tokenizer has no chat template")
        return tokenizer.apply_chat_template(example["messages"], tokenize=False, add_generation_prompt=True)
    return build_prompt(example, tokenizer, template=template, eviction_rate=eviction_rate)


def completion_text(tokenizer, ids: list[int]) -> str:
    """What the verifier reads (the one decoder, training's rewards included): the decoded
    completion with special tokens kept (``<answer>`` may be one) and a final EOS dropped."""
    eos = tokenizer.eos_token_id
    if ids and eos is not None and ids[-1] == eos:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False)


def grade(examples: list[dict], completions: list[str], prompts: list[str], *, reward: str | None = None,
          reward_kwargs: dict | None = None) -> list[float]:
    """Verifier score of each completion (example ``i`` graded against completion ``i``): the one
    grader, used by ``rlmem eval``, the in-training evaluation and training's rewards.

    ``reward`` names the verifier for every example (a training run's ``data.reward``, with
    ``reward_kwargs``); without it examples are grouped by their own ``reward`` name. Each group is
    one TRL-style call: the completions, ``prompts=``, and the examples' columns as lists. A
    verifier's ``None`` scores 0.0.
    """
    from rewards import get_reward

    if len(examples) != len(completions):
        raise ValueError(f"{len(examples)} examples for {len(completions)} completions")
    scores = [0.0] * len(examples)
    by_reward: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        name = reward or ex.get("reward") or ("countdown" if "numbers" in ex else "math")
        by_reward.setdefault(name, []).append(i)
    for name, idx in by_reward.items():
        fn = get_reward(name)
        keys = sorted({k for i in idx for k in examples[i]} - {"prompt", "prompts", "completions", "messages"}
                      - set(reward_kwargs or {}))
        cols = {k: [examples[i].get(k) for i in idx] for k in keys}
        out = fn([completions[i] for i in idx], prompts=[prompts[i] for i in idx], **cols, **(reward_kwargs or {}))
        if len(out) != len(idx):
            raise ValueError(f"reward {name!r} returned {len(out)} values for {len(idx)} completions")
        for i, v in zip(idx, out):
            scores[i] = 0.0 if v is None else float(v)
    return scores
