"""Cost of distillation's soft loss: one training batch, forward + backward, hard loss alone vs hard + top-k soft.

The soft loss is timed as two softmax passes (the hard target's, then the k ids') and as one pass over
k + 1 ids (the target appended), which is what the trainer runs when there is no training cache.

    python bench/distill.py [--case wt2ref] [--threads 2] [--reps 5] [--out bench/out/distill.json]

Both losses are timed alternately in one process on the same batch (ratios are fair on a noisy
machine), under the run's precision (``--amp bf16`` as experiment=distill_wt2ref_8.3M trains). The top-k
ids are distinct per row and drawn Zipf-like (a teacher's top-30 is mostly frequent words, with tail
words in most rows). Only the library's public API is used, so ``PYTHONPATH=<worktree of another
commit>`` times that commit's code with the same harness.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import dataclasses

import torch

sys.path.insert(0, str(Path(__file__).parent))
from throughput import model_config  # noqa: E402

from micronet.model.transformer import TransformerLM  # noqa: E402
from micronet.training.distill import distill_loss, gather_log_probs  # noqa: E402

CASES = {  # name: (throughput case, overrides, batch, chunk): experiment=distill_wt2ref_8.3M's model and batch
    "wt2ref": ("wt2_8.3M", {"dropout": 0.3, "segment_len": 32}, 8, 288),
}


def zipf_topk(n: int, vocab: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """(n, k) distinct ids per row, P(id) ~ 1 / (id + 10)."""
    weights = 1.0 / (torch.arange(vocab, dtype=torch.float64) + 10)
    return torch.multinomial(weights.float().expand(n, vocab), k, replacement=False, generator=gen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="wt2ref", choices=sorted(CASES))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--topk", type=int, default=30)
    ap.add_argument("--amp", default="bf16", choices=["bf16", "none"])
    ap.add_argument("--label", default="", help="name of the code under test (e.g. a commit)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "distill.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    case, over, B, T = CASES[args.case]
    cfg = dataclasses.replace(model_config(case), **over)
    vocab = cfg.vocab_size
    torch.manual_seed(0)
    model = TransformerLM(cfg).train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (B, T), generator=gen)
    y = torch.randint(0, vocab, (B, T), generator=gen)
    ids = zipf_topk(B * T, vocab, args.topk, gen).view(B, T, args.topk)
    probs = torch.rand(B, T, args.topk, generator=gen).sort(-1, descending=True).values.half()

    def step(loss_kind: str) -> float:
        model.zero_grad(set_to_none=True)
        t0 = time.process_time()  # CPU seconds: less sensitive than wall time to other jobs
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            h, _ = model(x)  # (B, T, d_model)
            if loss_kind == "hard+soft one pass":  # the target as a (k+1)-th id, as the trainer does
                both = gather_log_probs(model.softmax, h, torch.cat([ids, y[..., None]], -1))
                loss = distill_loss(both[..., -1], both[..., :-1], probs, 0.7)
            else:
                lp = model.target_log_probs(h, y)  # (B, T)
                loss = distill_loss(lp, gather_log_probs(model.softmax, h, ids), probs, 0.7) \
                    if loss_kind == "hard+soft" else -lp.mean()
        loss.backward()
        return time.process_time() - t0

    times: dict[str, list[float]] = {"hard": [], "hard+soft": [], "hard+soft one pass": []}
    for _ in range(2):  # warm-up: the allocator reaches its working size
        for kind in times:
            step(kind)
    for _ in range(args.reps):
        for kind in times:
            times[kind].append(step(kind))
    best = {k: min(v) for k, v in times.items()}
    row = {"label": args.label, "case": args.case, "amp": args.amp, "threads": torch.get_num_threads(),
           "batch": [B, T], "topk": args.topk, "cpu_s_per_batch": best, "all_cpu_s": times,
           "soft_overhead": {k: best[k] / best["hard"] - 1 for k in best if k != "hard"},
           "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    print(json.dumps(row, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    args.out.write_text(json.dumps([*rows, row], indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
