"""Training-time adaptive softmax: blocked target log-probs vs. full log_softmax + gather.

    python bench/softmax.py [--cases 8.3M,wt2_default] [--threads N] [--out bench/out/softmax.json]

Forward + backward of ``log p(target)`` on one training batch of hidden states, both paths
alternated in one process (so the ratio is fair on a noisy machine); the gradients are checked equal.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from throughput import CASES, model_config, synthetic_tokens  # noqa: E402

from micronet.model.transformer import TransformerLM  # noqa: E402


def reference_target_log_probs(sm, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The straightforward path: log_softmax over every bin's words, then gather."""
    head = sm.head_log_probs(h)
    n_head = sm.edges[1]
    out = torch.empty(target.shape, dtype=head.dtype)
    in_head = target < n_head
    out[in_head] = head[in_head].gather(1, target[in_head, None]).squeeze(1)
    for i in range(1, sm.n_bins):
        lo, hi = sm.edges[i], sm.edges[i + 1]
        rows = ((target >= lo) & (target < hi)).nonzero(as_tuple=True)[0]
        tail = F.log_softmax(F.linear(sm.projs[i](h[rows]), sm.table(i), sm.biases[i]), dim=-1)
        out[rows] = tail.gather(1, (target[rows] - lo)[:, None]).squeeze(1) + head[rows, n_head + i - 1]
    return out


def time_path(fn, model, h, y, reps: int) -> tuple[float, list[torch.Tensor]]:
    best = float("inf")
    for _ in range(reps):
        model.zero_grad(set_to_none=True)
        t0 = time.process_time()  # CPU seconds: less sensitive than wall time to other jobs on the machine
        fn(h, y).mean().backward()
        best = min(best, time.process_time() - t0)
    return best, [p.grad.clone() for p in model.softmax.parameters()] + [model.embed.tables[0].weight.grad.clone()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="8.3M,wt2_default")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "softmax.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.cases.split(","):
        cfg, (batch, chunk) = model_config(name), CASES[name][2:4]
        torch.manual_seed(0)
        model = TransformerLM(cfg)
        n = batch * chunk
        y = torch.from_numpy(synthetic_tokens(cfg, n).astype("int64"))
        h = torch.randn(n, cfg.d_model)
        t_ref, g_ref = time_path(lambda a, b: reference_target_log_probs(model.softmax, a, b), model, h, y, args.reps)
        t_new, g_new = time_path(model.softmax.target_log_probs, model, h, y, args.reps)
        err = max((a - b).abs().max().item() for a, b in zip(g_ref, g_new))
        row = {"case": name, "rows": n, "reference_cpu_s": t_ref, "blocked_cpu_s": t_new, "speedup": t_ref / t_new,
               "max_grad_diff": err}
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__,
                                    "cases": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
