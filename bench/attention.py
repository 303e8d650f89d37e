"""Training-time attention and dropout on CPU: the band kernels vs. the autograd/SDPA baseline.

    python bench/attention.py [--out bench/out/attention.json] [--reps 6]

One attention layer, forward + backward, at the training shapes of the 8.3M model (14 x 1152 tokens)
and of the default WikiText-2 model (8 x 256, dropout 0.1; shapes from conf/model), side by side in one process (alternating
repetitions, medians). The baseline is the previous implementation written with public torch ops:
unfold windows (autograd's unfold backward), a separate additive mask, flip + skew of the position
logits, and ``scaled_dot_product_attention``, whose CPU training path is the math fallback with a
NaN-guarded softmax and Bernoulli dropout. Also times dropout alone: ``F.dropout`` vs. the hash mask.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from micronet.model.band_attention import skew
from micronet.model.dropout import dropout
from micronet.model.transformer import WindowAttention

sys.path.insert(0, str(Path(__file__).parent))
from throughput import CASES, model_config  # noqa: E402  (the same shapes as the throughput bench)


def baseline_attention(a: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """The previous training path of ``a`` (no memory): same result, autograd/SDPA kernels."""
    B, T, _ = x.shape
    H, dh, M, L = a.n_head, a.d_head, a.n_seq, min(a.segment_len, T)
    S = -(-T // L)
    qkv = a.qkv(x).view(B, T, 3, H, dh)  # (B, T, 3, H, dh)
    q, kv = qkv[:, :, 0], qkv[:, :, 1:]
    kv_all = F.pad(torch.cat([kv.new_zeros(B, M, 2, H, dh), kv], 1), (0, 0, 0, 0, 0, 0, 0, S * L - T))
    q = F.pad(q, (0, 0, 0, 0, 0, S * L - T))  # (B, S*L, H, dh)
    win = kv_all.unfold(1, M + L, L)  # (B, S, 2, H, dh, M+L)
    k = win[:, :, 0].transpose(-1, -2).reshape(B * S, H, M + L, dh)
    v = win[:, :, 1].transpose(-1, -2).reshape(B * S, H, M + L, dh)
    q = q.view(B, S, L, H, dh).transpose(2, 3).reshape(B * S, H, L, dh) * dh**-0.5
    pos = torch.matmul(q, a.pos).flip(-1)  # (B*S, H, L, C)
    s = torch.arange(S)[:, None, None]
    i = torch.arange(L)[None, :, None]
    j = torch.arange(M + L)[None, None, :]
    visible = (M + i - j >= 0) & (M + i - j <= M) & (s * L - M + j >= 0)
    mask = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))[:, None]  # (S, 1, L, M+L)
    bias = (skew(pos).view(B, S, H, L, M + L) + mask).view(B * S, H, L, M + L)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=a.dropout if a.training else 0.0, scale=1.0)
    return a.out(y.view(B, S, H, L, dh).transpose(2, 3).reshape(B, S * L, H * dh)[:, :T])


def time_alternating(fns: dict, reps: int) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved so that machine noise hits all."""
    for f in fns.values():
        f()
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_case(name: str, reps: int) -> dict:
    cfg, (batch, T) = model_config(name), CASES[name][2:4]
    torch.manual_seed(0)
    a = WindowAttention(cfg).train()
    x = torch.randn(batch, T, cfg.d_model, requires_grad=True)
    g = torch.randn(batch, T, cfg.d_model)
    with torch.no_grad():
        a.pos.normal_(0, 0.02)

    def run(fn):
        def step():
            torch.autograd.backward(fn(), g)
            x.grad = None
            a.zero_grad(set_to_none=True)
        return step

    a.dropout = 0.0  # equal outputs need equal masks: check with dropout off
    assert torch.allclose(a(x, None, 0)[0], baseline_attention(a, x), atol=1e-5), name
    a.dropout = cfg.dropout
    t = time_alternating({"baseline": run(lambda: baseline_attention(a, x)), "band": run(lambda: a(x, None, 0)[0])},
                         reps)
    n = a.n_head * batch * -(-T // cfg.segment_len) * cfg.segment_len * (cfg.n_seq + cfg.segment_len)
    probs = torch.rand(n)
    d = time_alternating({"F.dropout": lambda: F.dropout(probs, 0.1, True), "hash": lambda: dropout(probs, 0.1)}, reps)
    return {"case": name, "batch": batch, "tokens": T, "segment_len": cfg.segment_len, "dropout": cfg.dropout,
            "attention_fwd_bwd_ms": {k: v * 1e3 for k, v in t.items()}, "attention_speedup": t["baseline"] / t["band"],
            "dropout_elements": n, "dropout_fwd_ms": {k: v * 1e3 for k, v in d.items()},
            "dropout_speedup": d["F.dropout"] / d["hash"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "attention.json")
    ap.add_argument("--cases", default="8.3M,wt2_default")
    ap.add_argument("--reps", type=int, default=6)
    args = ap.parse_args()
    rows = []
    for name in args.cases.split(","):
        rows.append(bench_case(name, args.reps))
        print(json.dumps(rows[-1]), flush=True)
    result = {"machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__}, "cases": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
