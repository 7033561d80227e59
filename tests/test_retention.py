"""What a policy keeps over many rollouts (rlmem.evaluation.retention, ``rlmem inspect --retention``).

The records are built by hand on a schedule small enough to work out on paper, and validated with
the record parser, so the schedule and keep counts are the ones every engine writes.
"""

import json
import subprocess
import sys

import pytest

from rlmem.evaluation.retention import format_retention, prompt_retention
from rlmem.eviction.policy import EvictionConfig
from rlmem.eviction.record import EvictionRound, EvictionTrace, LayerEviction, RolloutRecord

# δ=4, b=2, ε=0.5, protect 1; prompt of 4 tokens, 6 completion tokens: rounds at t=4 and t=8.
# t=4: 2 blocks, keep 1 = the protected newest one, so prompt keys 0-1 always go.
# t=8: alive keys 2..7 in 3 blocks, keep 2: the protected block and one of blocks 0 (keys 2-3) or 1.
CFG = EvictionConfig(delta=4, eps=0.5, block_size=2, window=2, protect_recent=1)


def record(second_round_kept: list[int], reward: float) -> RolloutRecord:
    rounds = [EvictionRound(4, [LayerEviction(2, [], 0.0) for _ in range(2)]),
              EvictionRound(8, [LayerEviction(3, [k], -0.5) for k in second_round_kept])]
    rec = RolloutRecord([1, 2, 3, 4], [5, 6, 7, 8, 9, 10], [-0.1] * 6, 1.0, reward, EvictionTrace(CFG, rounds))
    rec.validate()
    return rec


def test_retention_per_position_layer_and_reward_split():
    full = RolloutRecord([1, 2, 3, 4], [5, 6], [-0.1, -0.1], 1.0, 1.0, None)   # ignored: nothing evicted
    rows = prompt_retention([record([0, 0], 1.0), record([0, 1], 0.0), full])
    assert [r.position for r in rows] == [0, 1, 2, 3]
    assert [r.token_id for r in rows] == [1, 2, 3, 4]
    for r in rows[:2]:                       # evicted by both layers at t=4 in both rollouts
        assert r.kept == (0.0, 0.0) and r.kept_all_layers == 0.0
        assert r.reward_kept is None and r.reward_evicted == pytest.approx(0.5)
    for r in rows[2:]:                       # layer 0 kept block 0 twice, layer 1 once
        assert r.kept == (1.0, 0.5) and r.kept_all_layers == 0.5
        assert r.reward_kept == 1.0 and r.reward_evicted == 0.0
    text = format_retention(rows, ["a", "b", "c", "d"]).splitlines()
    assert text[2].split() == ["0", "a", "0.0", "0.0", "0.0", "|", "-", "50.0"]
    assert text[4].split() == ["2", "c", "100.0", "50.0", "50.0", "|", "100.0", "0.0"]


def test_retention_refuses_full_cache_and_mixed_models():
    full = RolloutRecord([1, 2, 3, 4], [5, 6], [-0.1, -0.1], 1.0, 1.0, None)
    with pytest.raises(ValueError, match="no record has eviction rounds"):
        prompt_retention([full])
    three = record([0, 0], 1.0)
    three.eviction.rounds = [EvictionRound(r.t, r.layers + r.layers[:1]) for r in three.eviction.rounds]
    with pytest.raises(ValueError, match="number of layers"):
        prompt_retention([record([0, 0], 1.0), three])


def test_inspect_retention_command(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in [record([0, 0], 1.0), record([0, 1], 0.0)]))
    proc = subprocess.run([sys.executable, "-m", "rlmem.cli", "inspect", str(path), "--retention"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "2 rollouts, 2 with eviction rounds" in proc.stdout
    assert any(line.split()[:5] == ["2", "3", "100.0", "50.0", "50.0"] for line in proc.stdout.splitlines())
    full = tmp_path / "full.jsonl"
    full.write_text(json.dumps(RolloutRecord([1, 2], [3], [-0.1], 1.0, 0.0, None).to_dict()) + "\n")
    proc = subprocess.run([sys.executable, "-m", "rlmem.cli", "inspect", str(full), "--retention"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "full.jsonl" in proc.stderr and "no record has eviction rounds" in proc.stderr
    assert "Traceback" not in proc.stderr
