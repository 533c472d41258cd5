"""examples/ppo_loop.py, short and seeded: the reward rises, the KL stays non-negative, ONNX matches PyTorch."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ppo_loop.py"


def load_example():
    spec = importlib.util.spec_from_file_location("ppo_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_short_ppo_run_raises_the_reward(tmp_path, capsys):
    report = load_example().main(["--iterations", "6", "--batch", "32", "--out", str(tmp_path), "--quiet"])
    rows, summary = report["iterations"], report["summary"]
    rewards = [row["reward"] for row in rows]
    # measured, not assumed: the last two iterations against the first two, on a fixed seed
    assert summary["window"] == 2
    assert summary["last_reward"] > summary["first_reward"] + 0.05, rewards
    assert summary["reward_rose"]
    assert abs(rows[0]["kl"]) < 1e-4  # the policy starts as the reference (rollout vs score: last bits only)
    assert summary["mean_kl"] >= 0, [row["kl"] for row in rows]
    # every iteration pushed new weights, and the next rollout ran on them (the example refuses a stale one)
    assert len({row["weights_version"] for row in rows}) == len(rows)
    # the rollouts' log-probs and values were the PyTorch model's (the example raises past the tolerance)
    assert max(row["max_logprob_diff"] for row in rows) < 1e-3
    assert max(row["max_value_diff"] for row in rows) < 1e-3
    saved = json.loads((tmp_path / "ppo_metrics.json").read_text())
    assert saved["iterations"] == rows and saved["summary"] == summary
    assert (tmp_path / "ppo_curve.png").stat().st_size > 0
    assert "rose" in capsys.readouterr().out
