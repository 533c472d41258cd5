"""PPO on the tiny demo model: rollouts on ONNX with t5vh_fast, training in PyTorch, weights pushed back each iteration.

    python examples/ppo_loop.py                              # 60 iterations, under a minute on this 2-core CPU
    python examples/ppo_loop.py --iterations 6 --batch 32    # the test suite's short run
    python examples/ppo_loop.py --detach-head --out ppo-run  # the value loss trains the head only

The toy task: reward each response by the share of its tokens that are one of
a few whole words (``WORDS``). Every iteration:

1. rollout (ONNX): ``policy.respond_to_batch`` samples the responses, with the
   log-prob and value of every token, seeded;
2. scoring: the reward; the KL to a frozen reference policy (the same export,
   loaded once more and never updated) from ``reference.score``; and the
   check this package exists for: the PyTorch model, teacher-forced on the
   same tokens, gives the rollout's log-probs and values within
   1e-4 x max(1, max|ref|), so the PPO ratio starts at 1;
3. training (PyTorch): the clipped PPO policy loss and clipped value loss on
   ``T5HeadWithValueModel``, a few epochs of minibatches;
4. refresh: ``policy.update_weights(model)``; the next rollout must carry the
   new ``weights_version`` (a trainer refuses rollouts of stale weights).

Writes ``ppo_metrics.json`` (per iteration: reward, KL, losses, parity, the
time of each phase) and ``ppo_curve.png`` into ``--out``.

With the default ``--beta 0.2`` the policy learns to write nothing but target
words (reward ~0.98, KL ~25 nats per response): the toy reward is hacked, as
toy rewards are. ``--beta 1.0`` holds it near the reference (reward ~0.2, KL
~3.5).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import t5vh_fast
from t5vh_fast.checkpoint import load_reference
from t5vh_fast.demo import write_demo
from t5vh_fast.export import export

# The reward: the share of response tokens that are one of these words (each is one token of the demo tokenizer).
WORDS = ("learn", "learning", "reward", "value", "token", "science", "course", "response", "time")
PROMPTS = (
    "paraphrase: Which course should I take to get started in data science?",
    "What is the fastest way to learn a new language?",
    "Summarize: The committee met on Tuesday and agreed to publish the report next month.",
    "How do I cook rice without a rice cooker?",
    "Why is the sky blue during the day and red at sunset?",
    "Question: how many legs does a spider have? Answer:",
    "Please rewrite this sentence so that it keeps its meaning.",
    "What should I take with me on a long hike in the mountains?",
)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=60)
    p.add_argument("--batch", type=int, default=64, help="responses per iteration")
    p.add_argument("--txt-len", type=int, default=16, help="tokens per response")
    p.add_argument("--epochs", type=int, default=4, help="PPO epochs over each batch")
    p.add_argument("--minibatch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=0.2, help="KL penalty coefficient")
    p.add_argument("--clip", type=float, default=0.2, help="PPO ratio clip")
    p.add_argument("--clip-value", type=float, default=0.2, help="value clip")
    p.add_argument("--vf-coef", type=float, default=0.1, help="weight of the value loss")
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--lam", type=float, default=0.95, help="GAE lambda")
    p.add_argument("--detach-head", action="store_true", help="the value loss trains the value head only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="threads for onnxruntime and for torch (tiny model: 1)")
    p.add_argument("--out", type=Path, default=Path("ppo-run"), help="where the JSON and the plot go")
    p.add_argument("--quiet", action="store_true", help="no per-iteration lines")
    return p.parse_args(argv)


def word_ids(tokenizer) -> np.ndarray:
    ids = [tokenizer.token_to_id("\u2581" + word) for word in WORDS]  # "▁word": the word at a word start
    missing = [w for w, i in zip(WORDS, ids) if i is None]
    if missing:
        raise SystemExit(f"the tokenizer has no single token for {missing}")
    return np.array(ids)


def advantages(rewards: np.ndarray, values: np.ndarray, gamma: float, lam: float):
    """GAE over each response (the value after the last token is 0); returns (advantages, returns)."""
    adv = np.zeros_like(rewards)
    last = np.zeros(rewards.shape[0], dtype=rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    return adv, adv + values


def forward(model, ids, mask, tokens):
    """Teacher-forced log-probs of ``tokens`` and values, from the PyTorch model."""
    out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=model._shift_right(tokens))
    logits = out.logits.float()
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    return logprobs, out.value.float(), logits


def check_parity(model, ids, mask, rollout) -> dict:
    """The rollout's (ONNX) log-probs and values against the PyTorch model's on the same tokens."""
    with torch.no_grad():
        logprobs, values, logits = forward(model, ids, mask, torch.from_numpy(rollout.tokens))
    diff_lp = float(np.abs(logprobs.numpy() - rollout.logprobs).max())
    diff_v = float(np.abs(values.numpy() - rollout.values).max())
    tol_lp = 1e-4 * max(1.0, float(logits.abs().max()))
    tol_v = 1e-4 * max(1.0, float(values.abs().max()))
    if diff_lp > tol_lp or diff_v > tol_v:
        raise RuntimeError(
            f"the ONNX rollout does not match the PyTorch model: max |dlogprob| {diff_lp:.2e} (tol {tol_lp:.1e}), "
            f"max |dvalue| {diff_v:.2e} (tol {tol_v:.1e})"
        )
    return {"max_logprob_diff": diff_lp, "max_value_diff": diff_v}


def ppo_update(model, optimizer, batch: dict, args, rng) -> dict:
    """Clipped PPO policy loss + clipped value loss, ``args.epochs`` passes of shuffled minibatches."""
    n = batch["tokens"].shape[0]
    stats = {"policy_loss": [], "value_loss": [], "clip_fraction": []}
    for _ in range(args.epochs):
        order = rng.permutation(n)
        for start in range(0, n, args.minibatch):
            mb = {k: v[order[start : start + args.minibatch]] for k, v in batch.items()}
            logprobs, values, _ = forward(model, mb["ids"], mb["mask"], mb["tokens"])
            ratio = torch.exp(logprobs - mb["old_logprobs"])
            clipped = torch.clamp(ratio, 1 - args.clip, 1 + args.clip)
            policy_loss = torch.max(-mb["advantages"] * ratio, -mb["advantages"] * clipped).mean()
            old_values, returns = mb["old_values"], mb["returns"]
            clipped_values = old_values + torch.clamp(values - old_values, -args.clip_value, args.clip_value)
            value_loss = 0.5 * torch.max((values - returns) ** 2, (clipped_values - returns) ** 2).mean()
            loss = policy_loss + args.vf_coef * value_loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            stats["policy_loss"].append(policy_loss.item())
            stats["value_loss"].append(value_loss.item())
            stats["clip_fraction"].append(float(((ratio - 1).abs() > args.clip).float().mean()))
    return {k: float(np.mean(v)) for k, v in stats.items()}


def run(args, work: Path) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    print(f"building the tiny demo model and its export in {work} ...", file=sys.stderr)
    model_dir = write_demo(work / "demo-tiny", size="tiny")
    export_dir = export(model_dir, work / "demo-tiny-onnx", optimum=False)  # the single layout is all we run
    policy = t5vh_fast.load(export_dir, providers="cpu", threads=args.threads)
    reference = t5vh_fast.load(export_dir, providers="cpu", threads=args.threads)  # frozen: never updated
    model = load_reference(model_dir)  # the same weights, in PyTorch: what PPO trains
    model.eval()  # no dropout: the PPO ratio of the first minibatch is exactly the parity check's
    if args.detach_head:
        model.detach_head()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    targets = word_ids(policy.tokenizer)
    version = policy.weights_version
    history = []
    for iteration in range(args.iterations):
        start = time.perf_counter()
        prompts = [PROMPTS[i] for i in rng.integers(len(PROMPTS), size=args.batch)]
        ids, mask = policy.encode_text(prompts)
        rollout = policy.respond_to_batch(ids, mask, txt_len=args.txt_len, seed=args.seed * 100_003 + iteration)
        if rollout.weights_version != version:
            raise RuntimeError(f"stale rollout: weights {rollout.weights_version}, the trainer has {version}")
        rollout_s = time.perf_counter() - start

        start = time.perf_counter()
        hits = np.isin(rollout.tokens, targets)
        score = hits.mean(axis=1)  # the task reward of each response: the share of target words
        ref_logprobs = reference.score(ids, rollout.tokens, mask).logprobs
        kl = rollout.logprobs - ref_logprobs  # per token: log p - log p_ref on the policy's own samples
        rewards = hits - args.beta * kl  # per token: a response's return is its number of target words - beta * KL
        ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
        parity = check_parity(model, ids_t, mask_t, rollout)
        scoring_s = time.perf_counter() - start

        start = time.perf_counter()
        adv, returns = advantages(rewards, rollout.values, args.gamma, args.lam)
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        batch = {
            "ids": ids_t,
            "mask": mask_t,
            "tokens": torch.from_numpy(rollout.tokens),
            "old_logprobs": torch.from_numpy(rollout.logprobs),
            "old_values": torch.from_numpy(rollout.values),
            "advantages": torch.from_numpy(adv.astype(np.float32)),
            "returns": torch.from_numpy(returns.astype(np.float32)),
        }
        losses = ppo_update(model, optimizer, batch, args, rng)
        training_s = time.perf_counter() - start

        start = time.perf_counter()
        version = policy.update_weights(model)
        refresh_s = time.perf_counter() - start

        row = {
            "iteration": iteration,
            "reward": float(score.mean()),
            "kl": float(kl.sum(axis=1).mean()),
            "total_reward": float((score - args.beta * kl.sum(axis=1)).mean()),
            **losses,
            **parity,
            "rollout_s": rollout_s,
            "scoring_s": scoring_s,
            "training_s": training_s,
            "refresh_s": refresh_s,
            "weights_version": rollout.weights_version,
            "sample": f"{prompts[0]} -> {policy.decode_text(rollout.tokens[:1])[0]}",
        }
        history.append(row)
        if not args.quiet:
            print(
                f"iter {iteration:3d}  reward {row['reward']:.3f}  kl {row['kl']:+.3f}  "
                f"rollout {rollout_s:.2f}s  scoring {scoring_s:.2f}s  training {training_s:.2f}s  "
                f"refresh {refresh_s:.3f}s  |dlogp| {parity['max_logprob_diff']:.1e}"
            )
    return {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "iterations": history}


def summarize(report: dict) -> dict:
    """Did the reward rise? The mean of the last few iterations against the first few, and the mean KL."""
    rewards = [row["reward"] for row in report["iterations"]]
    k = min(max(2, len(rewards) // 10), max(1, len(rewards) // 2))  # 6 iterations: 2; 60: 6
    first, last = float(np.mean(rewards[:k])), float(np.mean(rewards[-k:]))
    kls = [row["kl"] for row in report["iterations"]]
    return {
        "window": k,
        "first_reward": first,
        "last_reward": last,
        "reward_rose": last > first,
        "mean_kl": float(np.mean(kls)),
        "mean_refresh_s": float(np.mean([row["refresh_s"] for row in report["iterations"]])),
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["iterations"]
    x = [r["iteration"] for r in rows]
    fig, (ax_r, ax_kl, ax_t) = plt.subplots(1, 3, figsize=(14, 4))
    ax_r.plot(x, [r["reward"] for r in rows], marker=".")
    ax_r.set(title="mean reward (share of target words)", xlabel="iteration")
    ax_kl.plot(x, [r["kl"] for r in rows], marker=".", color="tab:red")
    ax_kl.axhline(0, color="gray", lw=0.5)
    ax_kl.set(title="mean KL to the reference (per response)", xlabel="iteration")
    bottom = np.zeros(len(rows))
    for phase in ("rollout_s", "scoring_s", "training_s", "refresh_s"):
        values = np.array([r[phase] for r in rows])
        ax_t.bar(x, values, bottom=bottom, label=phase[:-2])
        bottom += values
    ax_t.set(title="seconds per iteration", xlabel="iteration")
    ax_t.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="t5vh-ppo-") as work:
        report = run(args, Path(work))
    report["summary"] = summary = summarize(report)
    (args.out / "ppo_metrics.json").write_text(json.dumps(report, indent=1))
    plot(report, args.out / "ppo_curve.png")
    print(
        f"reward {summary['first_reward']:.3f} (first {summary['window']} iterations) -> "
        f"{summary['last_reward']:.3f} (last {summary['window']}): {'rose' if summary['reward_rose'] else 'did NOT rise'}; "
        f"mean KL {summary['mean_kl']:+.3f}; refresh {summary['mean_refresh_s'] * 1000:.0f} ms per iteration; "
        f"wrote {args.out / 'ppo_metrics.json'} and {args.out / 'ppo_curve.png'}"
    )
    print(f"first response: {report['iterations'][0]['sample']}\nlast response:  {report['iterations'][-1]['sample']}")
    return report


if __name__ == "__main__":
    main()
