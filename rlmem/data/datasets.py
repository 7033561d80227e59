"""Dataset registry: hub ids, generated tasks and local JSONL/Parquet files -> task examples.

Every named source is a :class:`DatasetSpec` in :data:`DATASETS` (``register_dataset`` adds one);
:func:`load_examples` reads any of them through the registry, and local files with a registered
dataset's schema.

Every loader returns a list of examples, each a dict with at least ``"id"``, ``"prompt"`` (the
task statement: no instruction, no chat template), ``"reward"`` (a registered reward name),
``"task"`` (``countdown`` or ``math``) and the reward columns (``target`` + ``numbers`` for
Countdown, ``answer`` for math).

Known datasets (column schemas as published on the hub):

===================================  ==========  =================================================
id                                   hub split   columns used
===================================  ==========  =================================================
``Jiayi-Pan/Countdown-Tasks-3to4``   train       ``target`` (int), ``nums`` (list[int])
``BytedTsinghua-SIA/DAPO-Math-17k``  train       ``prompt`` (chat list), ``reward_model.ground_truth``,
                                                 ``data_source``, ``extra_info.index``
``math-ai/amc23``                    test        ``id``, ``question``, ``answer`` (float)
``HuggingFaceH4/aime_2024``          train       ``id``, ``problem``, ``answer`` (str)
``MathArena/aime_2025``              train       ``problem_idx``, ``problem``, ``answer``
===================================  ==========  =================================================

* Countdown is split like the paper: the first 327,680 rows are ``train``, the next 1,024
  ``test``. Test rows that are a reordered duplicate of a train row (same target, same multiset of
  numbers) are dropped (``drop_leaks``, default True) and counted in a warning.
* DAPO-Math-17k (which ships each of its ~17k problems many times) is de-duplicated on the
  problem text; its fixed instruction wrapper ("Solve the following math problem step by step...
  Answer: $Answer...") is stripped so that rlmem's own template applies.
* The evaluation sets have a single hub split, returned for any requested split name.

A local file (``.jsonl``, ``.json``, ``.parquet``) is read with the mapping of ``dataset=<id or
alias>`` or an explicit ``mapping={"prompt": col, "answer": col, ...}``; without either, the
schema is recognised from its columns. ``path=`` with a hub id reads that dataset's local copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from rlmem.data.countdown import countdown_prompt_text, generate_countdown
from rlmem.data.passkey import generate_passkey
from rlmem.data.toy import TASK as COUNTDOWN_TOY
from rlmem.data.toy import toy_problems
from rlmem.jsonl import iter_json_lines

log = logging.getLogger(__name__)

COUNTDOWN_TRAIN_SIZE = 327_680
COUNTDOWN_TEST_SIZE = 1_024

DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response should be of the "
               "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.")
DAPO_SUFFIX = 'Remember to put your answer on its own line after "Answer:".'


class DatasetError(ValueError):
    """A dataset row or file that cannot be turned into examples (names the file/field)."""


# ---------------------------------------------------------------------------------------------
# row converters: (row, index, origin) -> example
# ---------------------------------------------------------------------------------------------
def _get(row: dict, key: str, origin: str, index: int) -> Any:
    cur: Any = row
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise DatasetError(f"{origin}: row {index} has no field {key!r} (fields: {sorted(row)})")
        cur = cur[part]
    return cur


def _int_list(v: Any, origin: str, index: int, name: str) -> list[int]:
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            v = re.findall(r"-?\d+", v)
    try:
        out = [int(x) for x in v]
        if not out or any(float(x) != int(x) for x in v):
            raise ValueError
        return out
    except (TypeError, ValueError):
        raise DatasetError(f"{origin}: row {index} field {name!r} is not a list of integers: {v!r}") from None


def countdown_row(row: dict, index: int, origin: str, mapping: dict | None = None) -> dict:
    m = {"target": "target", "numbers": "nums", **(mapping or {})}
    if m["numbers"] not in row and "numbers" in row:
        m["numbers"] = "numbers"
    numbers = _int_list(_get(row, m["numbers"], origin, index), origin, index, m["numbers"])
    target_raw = _get(row, m["target"], origin, index)
    try:
        target = int(target_raw)
        if float(target_raw) != target:
            raise ValueError
    except (TypeError, ValueError):
        raise DatasetError(f"{origin}: row {index} field {m['target']!r} is not an integer: {target_raw!r}") from None
    ex = {"id": str(row.get("id", f"{origin}-{index}")), "prompt": countdown_prompt_text(numbers, target),
          "reward": "countdown", "task": "countdown", "target": target, "numbers": numbers}
    if "solution" in row:
        ex["solution"] = row["solution"]
    return ex


def _answer_str(v: Any) -> str:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def math_row(row: dict, index: int, origin: str, mapping: dict | None = None) -> dict:
    m = dict(mapping or {})
    pk = m.get("prompt") or next((k for k in ("problem", "question", "prompt") if k in row), "problem")
    ak = m.get("answer") or next((k for k in ("answer", "reward_model.ground_truth", "ground_truth") if
                                  (k in row if "." not in k else isinstance(row.get(k.split(".")[0]), dict))), "answer")
    prompt = _get(row, pk, origin, index)
    if isinstance(prompt, list):  # chat list
        prompt = "\n".join(str(msg.get("content", "")) for msg in prompt if isinstance(msg, dict) and msg.get("role", "user") == "user")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DatasetError(f"{origin}: row {index} field {pk!r} is empty or not text")
    answer = _get(row, ak, origin, index)
    if answer is None or _answer_str(answer) == "":
        raise DatasetError(f"{origin}: row {index} field {ak!r} (the answer) is empty")
    idk = m.get("id") or next((k for k in ("id", "problem_idx", "extra_info.index", "unique_id") if
                               (k in row if "." not in k else isinstance(row.get(k.split(".")[0]), dict))), None)
    rid = _get(row, idk, origin, index) if idk else index
    return {"id": f"{origin}-{rid}", "prompt": prompt.strip(), "reward": "math", "task": "math",
            "answer": _answer_str(answer)}


def strip_dapo_wrapper(text: str) -> str:
    t = text.strip()
    if t.startswith(DAPO_PREFIX):
        t = t[len(DAPO_PREFIX):]
    if t.endswith(DAPO_SUFFIX):
        t = t[: -len(DAPO_SUFFIX)]
    return t.strip()


def dapo_row(row: dict, index: int, origin: str, mapping: dict | None = None) -> dict:
    ex = math_row(row, index, origin, {"prompt": "prompt", "answer": "reward_model.ground_truth",
                                       "id": "extra_info.index", **(mapping or {})})
    ex["prompt"] = strip_dapo_wrapper(ex["prompt"])
    if "data_source" in row:
        ex["data_source"] = row["data_source"]
    return ex


# ---------------------------------------------------------------------------------------------
# registry: every named source (hub datasets and generated tasks) is a DatasetSpec in DATASETS
# ---------------------------------------------------------------------------------------------
@dataclass
class DatasetSpec:
    """One named data source. A hub dataset gives ``convert`` (row -> example), its ``hub_split`` and
    an optional ``post`` (split logic, de-duplication); a generated one gives ``generate``
    (``(split, limit=, seed=, **options) -> examples``). ``load_examples`` goes through :meth:`load`,
    so registering a spec is all it takes to add a source."""

    hub_id: str                                   # the name users write: a hub id or a generated source's name
    convert: Callable[..., dict] | None = None
    hub_split: str = "train"
    kind: str = "math"                            # "countdown" | "math" | "passkey"
    aliases: tuple[str, ...] = ()
    splits: tuple[str, ...] = ("train", "test")
    post: Callable[..., list] | None = None
    extra: dict = field(default_factory=dict)
    generate: Callable[..., list[dict]] | None = None

    def __post_init__(self) -> None:
        if (self.convert is None) == (self.generate is None):
            raise ValueError(f"dataset {self.hub_id!r}: give exactly one of convert (hub rows) or generate")

    def load(self, split: str, *, path: str | None = None, limit: int | None = None, seed: int = 0,
             mapping: dict | None = None, **kwargs) -> list[dict]:
        """This source's examples of ``split`` (hub rows, or ``path``'s local copy of them, converted)."""
        if split not in self.splits:
            raise ValueError(f"{self.hub_id} has no {split!r} split (has {self.splits})")
        if self.generate is not None:
            return self.generate(split, limit=limit, seed=seed, **kwargs)
        rows, locs = read_located_rows(path) if path else (_read_hub(self), None)
        return self.convert_rows(rows, locs, os.path.basename(path) if path else self.hub_id, split, mapping, **kwargs)

    def convert_rows(self, rows: list[dict], locs: list[str] | None, origin: str, split: str,
                     mapping: dict | None = None, **kwargs) -> list[dict]:
        examples = [_convert(self, r, i, origin, mapping, locs[i] if locs else None) for i, r in enumerate(rows)]
        return self.post(examples, split, **kwargs) if self.post is not None else examples


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add a source under its name and aliases (a name already taken is an error, not a silent swap)."""
    for name in (spec.hub_id, *spec.aliases):
        if name in DATASETS and DATASETS[name] is not spec:
            raise ValueError(f"dataset name {name!r} is already registered (by {DATASETS[name].hub_id!r})")
        DATASETS[name] = spec
    return spec


def dataset_names() -> list[str]:
    """The registered sources' names (aliases not repeated), in registration order."""
    return list(dict.fromkeys(s.hub_id for s in DATASETS.values()))


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(repr(n) for n in dataset_names())}, "
                       "or a local .jsonl/.parquet path")
    return DATASETS[name]


def countdown_key(ex: dict) -> tuple:
    return (int(ex["target"]), tuple(sorted(int(x) for x in ex["numbers"])))


def find_leaks(train: list[dict], test: list[dict]) -> list[int]:
    """Indices of ``test`` examples whose (target, multiset of numbers) occurs in ``train``."""
    seen = {countdown_key(e) for e in train}
    return [i for i, e in enumerate(test) if countdown_key(e) in seen]


def _countdown_post(rows_ex: list[dict], split: str, *, train_size: int = COUNTDOWN_TRAIN_SIZE,
                    test_size: int = COUNTDOWN_TEST_SIZE, drop_leaks: bool = True, **_) -> list[dict]:
    train = rows_ex[:train_size]
    if split == "train":
        return train
    if split != "test":
        raise ValueError(f"Countdown splits are 'train' and 'test' (got {split!r})")
    test = rows_ex[train_size: train_size + test_size]
    leaks = find_leaks(train, test)
    if leaks:
        log.warning("Countdown test split: %d of %d rows are reordered duplicates of train rows%s",
                    len(leaks), len(test), " (dropped)" if drop_leaks else "")
        if drop_leaks:
            bad = set(leaks)
            test = [e for i, e in enumerate(test) if i not in bad]
    return test


def dedup_by_prompt(examples: list[dict]) -> list[dict]:
    """Keep the first example of each distinct (whitespace-normalised) prompt."""
    seen, out = set(), []
    for e in examples:
        key = hashlib.sha1(" ".join(e["prompt"].split()).encode()).hexdigest()
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def _dapo_post(rows_ex: list[dict], split: str, **_) -> list[dict]:
    return dedup_by_prompt(rows_ex)


def _generate_passkey(variant: str, write_items: int):
    def generate(split: str, *, limit: int | None, seed: int, **kwargs) -> list[dict]:
        opts = {"write_items": write_items, **{k: kwargs[k] for k in ("filler_repeats", "write_items") if k in kwargs}}
        return generate_passkey(kwargs.get("num_examples", limit or 100), seed * 2 + (split == "test"),
                                variant=variant, **opts)
    return generate


def _generate_countdown(split: str, *, limit: int | None, seed: int, **kwargs) -> list[dict]:
    gen_kw = {k: kwargs[k] for k in ("num_examples", "num_numbers", "number_range", "target_range",
                                     "max_tries_per_example") if k in kwargs}
    gen_kw.setdefault("num_examples", limit or 1000)
    # train and test come from disjoint seeds
    examples = generate_countdown(seed=seed * 2 + (split == "test"), **gen_kw)
    for e in examples:
        e["id"] = f"countdown-gen-{split}-{e['id'].rsplit('-', 1)[-1]}"
    if split == "test" and kwargs.get("drop_leaks", True):
        train = generate_countdown(seed=seed * 2, **gen_kw)
        bad = set(find_leaks(train, examples))
        examples = [e for i, e in enumerate(examples) if i not in bad]
    return examples


def _generate_toy(split: str, *, limit: int | None, seed: int, **kwargs) -> list[dict]:
    return toy_problems(split, None, seed=seed)   # the toy task's fixed problem set, sampled with ``seed``


register_dataset(DatasetSpec("Jiayi-Pan/Countdown-Tasks-3to4", countdown_row, "train", "countdown",
                             aliases=("countdown",), post=_countdown_post))
register_dataset(DatasetSpec("BytedTsinghua-SIA/DAPO-Math-17k", dapo_row, "train", "math",
                             aliases=("dapo-math-17k", "dapo"), splits=("train",), post=_dapo_post))
register_dataset(DatasetSpec("math-ai/amc23", math_row, "test", "math", aliases=("amc23",)))
register_dataset(DatasetSpec("HuggingFaceH4/aime_2024", math_row, "train", "math", aliases=("aime24", "aime_2024")))
register_dataset(DatasetSpec("MathArena/aime_2025", math_row, "train", "math", aliases=("aime25", "aime_2025")))
# generated sources (no hub): Countdown from rlmem/data/countdown.py, the toy set, the pass-key tasks
register_dataset(DatasetSpec("countdown-generated", kind="countdown", aliases=("countdown_generated",),
                             generate=_generate_countdown))
register_dataset(DatasetSpec(COUNTDOWN_TOY, kind="countdown", generate=_generate_toy))
register_dataset(DatasetSpec("passkey", kind="passkey", generate=_generate_passkey("passkey", 0)))
register_dataset(DatasetSpec("passkey-write", kind="passkey", generate=_generate_passkey("passkey-write", 12)))


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")

def is_local_path(source: str) -> bool:
    return source.lower().endswith(LOCAL_SUFFIXES) or os.path.exists(source)


def read_rows(path: str) -> list[dict]:
    """Rows of a local ``.jsonl``/``.json``/``.parquet`` file (errors name the file and line)."""
    return read_located_rows(path)[0]


def read_located_rows(path: str) -> tuple[list[dict], list[str]]:
    """Rows of a local file and where each one is (``file:line`` for JSON lines, 1-based)."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: dataset file not found" if not os.path.exists(path) else f"{path}: not a file")
    low = path.lower()
    if low.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise DatasetError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        return rows, [f"{path} row {i + 1}" for i in range(len(rows))]
    if low.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if isinstance(data, dict):  # {"data": [...]} or column-oriented
            data = data.get("data", data.get("rows", data))
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a list of rows")
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise DatasetError(f"{path} row {i + 1}: a row must be a JSON object")
        return data, [f"{path} row {i + 1}" for i in range(len(data))]
    rows, locs = [], []
    for where, row in iter_json_lines(path, DatasetError):
        rows.append(row)
        locs.append(where)
    return rows, locs


def _read_hub(spec: DatasetSpec) -> list[dict]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover
        raise RuntimeError("the 'datasets' package is needed to load hub dataset ids") from e
    try:
        ds = datasets.load_dataset(spec.hub_id, split=spec.hub_split)
    except Exception as e:
        raise RuntimeError(f"cannot load {spec.hub_id!r} (split {spec.hub_split!r}) from the hub or its cache: {e}. "
                           f"Offline? Use a local .jsonl/.parquet copy (data.source / eval.source in a run config, "
                           f"path= in load_examples).") from e
    return ds.to_list()


def _guess_spec(rows: list[dict], path: str) -> DatasetSpec | None:
    if not rows:
        return None
    cols = set(rows[0])
    if "target" in cols and ("nums" in cols or "numbers" in cols):
        return DATASETS["Jiayi-Pan/Countdown-Tasks-3to4"]
    if "reward_model" in cols:
        return DATASETS["BytedTsinghua-SIA/DAPO-Math-17k"]
    if "answer" in cols and ("problem" in cols or "question" in cols):
        return DATASETS["math-ai/amc23"] if "question" in cols else DATASETS["HuggingFaceH4/aime_2024"]
    raise DatasetError(f"{path}: cannot recognise the schema from columns {sorted(cols)}; expected Countdown "
                       "('target' and 'nums' or 'numbers') or math ('problem' or 'question' with 'answer', or "
                       "'reward_model')")


def _convert(spec: DatasetSpec, row: dict, index: int, origin: str, mapping: dict | None, where: str | None) -> dict:
    """One example; a bad row's error names ``where`` (``file:line``) when the row came from a file."""
    try:
        return spec.convert(row, index, origin, mapping)
    except DatasetError as e:
        if where is None:
            raise
        msg = str(e).replace(f"{origin}: row {index} ", "row ", 1)
        raise DatasetError(f"{where}: {msg}") from None


def load_examples(source: str, split: str = "train", *, path: str | None = None, limit: int | None = None,
                  seed: int = 0, shuffle: bool = False, dataset: str | None = None, mapping: dict | None = None,
                  **kwargs) -> list[dict]:
    """Examples from a registered source (:data:`DATASETS`: the hub datasets and the generated
    ``"countdown-generated"``, ``"countdown-toy"`` (rlmem/data/toy.py), ``"passkey"``/``"passkey-write"``;
    :func:`register_dataset` adds one) or a local ``.jsonl``/``.parquet``.

    ``split`` is ``"train"`` or ``"test"`` (the evaluation sets return their single split for
    either). ``limit`` keeps the first ``limit`` examples (after shuffling with ``seed`` if
    ``shuffle``). Extra ``kwargs`` go to the generator (``num_examples``, ``num_numbers``,
    ``number_range``, ``target_range``) or to the split logic (``train_size``, ``test_size``,
    ``drop_leaks``).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test' (got {split!r})")
    if source in DATASETS:
        examples = DATASETS[source].load(split, path=path, limit=limit, seed=seed, mapping=mapping, **kwargs)
    elif is_local_path(source):
        rows, locs = read_located_rows(source)
        if not rows:
            raise DatasetError(f"{source}: no rows (the file is empty)")
        spec = _spec(dataset) if dataset else (None if mapping else _guess_spec(rows, source))
        if spec is None:  # explicit mapping without a dataset hint
            kind = "countdown" if "numbers" in mapping or "target" in mapping else "math"
            spec = DatasetSpec(source, countdown_row if kind == "countdown" else math_row, "", kind)
        if spec.convert is None:
            raise DatasetError(f"{source}: dataset={dataset!r} is a generated source; a file needs a hub "
                               "dataset's schema (or a mapping)")
        if split not in spec.splits:
            raise ValueError(f"{spec.hub_id} has no {split!r} split (has {spec.splits})")
        examples = spec.convert_rows(rows, locs, os.path.basename(source), split, mapping, **kwargs)
    else:
        _spec(source)  # raises KeyError listing the registered sources
        raise AssertionError
    if shuffle:
        random.Random(seed).shuffle(examples)
    if limit is not None:
        examples = examples[: int(limit)]
    return examples
