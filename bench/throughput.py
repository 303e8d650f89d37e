"""Training and evaluation throughput in fp32 and bf16, the machine's matmul rates, and model-FLOPs utilisation.

    python bench/throughput.py [--out bench/out/throughput.json] [--cases 8.3M,wt2_default] [--amp none,bf16]

Everything is measured in one process, side by side, so ratios are comparable on a noisy machine:
every (case, precision) is one row; ``--amp none`` is exact fp32, ``bf16`` trains under bf16 autocast
and evaluates under it (log-probabilities in fp32). The fp32 and bf16 matmul rates are measured right
before and right after every row, and its MFU is given against the mean of the rate of its own precision
(``*_mfu``) and against the higher of the two (``*_mfu_vs_max``). The bench only uses the library's public
API, so ``PYTHONPATH=<worktree of another commit>`` times that commit's code with the same harness
(bench/side_by_side.py).
Training is timed after ``--warmup`` steps, once the allocator's heap has reached its working size
(the minor page faults of the timed steps are reported), over at least ``--steps`` steps and
``--min-seconds`` (tokens/s over the whole window; the median step is reported beside it). Model
shapes are read from ``conf/model``; synthetic tokens follow the test-set bin fractions of
WikiText-103 (198232/35479/11858 of 245,569).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from micronet.data.corpus import Corpus
from micronet.model.cache import DEFAULT_LAMBDA, DEFAULT_THETA, EvalCache
from micronet.model.evaluation import evaluate_stream
from micronet.model.transformer import ModelConfig, count_parameters
from micronet.runs.results import RunDir
from micronet.training.config import OptimConfig, TrainConfig
from micronet.training.trainer import Trainer

WT103_TEST_BINS = (198232 / 245569, 35479 / 245569, 11858 / 245569)

CONF = Path(__file__).resolve().parent.parent / "conf" / "model"
CASES = {
    # name: (model config file, vocab, train batch, chunk, eval tokens)
    "8.3M": ("8.3M", 267735, 14, 1152, 16128),
    "wt2_default": ("wt2_small", 33278, 8, 256, 16128),  # the default model (conf/model/wt2_small.yaml)
    "wt2_8.3M": ("wt2_8.3M", 33278, 14, 1152, 16128),
}


def model_config(name: str) -> ModelConfig:
    """The case's model, as configured in conf/model."""
    conf, vocab = CASES[name][:2]
    return ModelConfig(**{**OmegaConf.to_container(OmegaConf.load(CONF / f"{conf}.yaml")), "vocab_size": vocab})


def matmul_gflops(n: int = 2048, seconds: float = 3.0, dtype: torch.dtype = torch.float32) -> float:
    """Sustained GEMM rate (fp32 or bf16) of this machine with torch's current thread count."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def synthetic_tokens(cfg: ModelConfig, n: int, seed: int = 0) -> np.ndarray:
    """Tokens whose adaptive-softmax bin fractions match WikiText-103's test set."""
    rng = np.random.default_rng(seed)
    edges = [0, *cfg.cutoffs, cfg.vocab_size]
    fr = np.array(WT103_TEST_BINS[: len(edges) - 1])
    bins = rng.choice(len(fr), size=n, p=fr / fr.sum())
    lo, hi = np.array(edges[:-1])[bins], np.array(edges[1:])[bins]
    return (lo + (rng.random(n) * (hi - lo)).astype(np.int64)).astype(np.int32)


def forward_flops_per_token(cfg: ModelConfig, bin_fractions: tuple[float, ...], all_tails: bool) -> float:
    """Matmul FLOPs per token of one forward pass (2 per multiply-add).

    Attention counts the band only (C keys per query), the work the model must do. Tails count
    for the fraction of rows whose target is in them (training/evaluation) or for every row.
    """
    hd = cfg.n_head * cfg.d_head
    C = cfg.attn_span
    per_layer = cfg.d_model * 3 * hd + hd * cfg.d_model + 2 * cfg.d_model * cfg.d_ff  # qkv, out, ffn
    per_layer += 2 * cfg.n_head * cfg.d_head * C + cfg.n_head * cfg.d_head * C  # q.k, attn.V, q.E
    flops = 2 * per_layer * cfg.n_layer
    edges = [0, *cfg.cutoffs, cfg.vocab_size]
    flops += 2 * cfg.d_model * (edges[1] + len(edges) - 2)  # head words + clusters
    for i in range(1, len(edges) - 1):
        frac = 1.0 if all_tails else bin_fractions[i]
        d_i, n_i = cfg.bin_dims[i], edges[i + 1] - edges[i]
        flops += 2 * frac * (cfg.d_model * d_i + d_i * n_i)  # output projection + tail logits
        flops += 2 * bin_fractions[i] * d_i * cfg.d_model  # input projection
    return flops


def matmul_rates(seconds: float = 3.0) -> dict:
    """fp32 and bf16 GEMM rates, GFLOP/s."""
    return {"fp32": matmul_gflops(seconds=seconds), "bf16": matmul_gflops(seconds=seconds, dtype=torch.bfloat16)}


def bench_case(name: str, steps: int, warmup: int, min_seconds: float, tmp: Path, amp: str = "none",
               batch: int | None = None) -> dict:
    cfg = model_config(name)
    case_batch, chunk, eval_tokens = CASES[name][2:]
    batch = batch or case_batch
    tokens = synthetic_tokens(cfg, 400_000)
    corpus = Corpus(vocab=[str(i) for i in range(cfg.vocab_size)], train=tokens, valid=tokens[:eval_tokens + 1],
                    test=tokens[:eval_tokens + 1], manifest={"vocab_size": cfg.vocab_size})
    tcfg = TrainConfig(steps=10_000, batch_size=batch, chunk_len=chunk, device="cpu", amp=amp)
    trainer = Trainer(RunDir(f"bench_{name}", tmp), tcfg, OptimConfig(warmup_steps=10), cfg, None, corpus, {})
    for _ in range(warmup):  # allocator heap, kernels
        trainer.train_step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step_s: list[float] = []
    t0 = time.perf_counter()
    while len(step_s) < steps or time.perf_counter() - t0 < min_seconds:  # short steps: a longer window
        t = time.perf_counter()
        trainer.train_step()
        step_s.append(time.perf_counter() - t)
    train_s = time.perf_counter() - t0
    steps = len(step_s)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
    train_tok_s = steps * batch * chunk / train_s
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
        evaluate_stream(trainer.model, tokens[:4033], 4032, "cpu")  # warm-up
        t0 = time.perf_counter()
        evaluate_stream(trainer.model, corpus.valid, 4032, "cpu")
        eval_tok_s = eval_tokens / (time.perf_counter() - t0)
        cache = EvalCache(3000, DEFAULT_LAMBDA, DEFAULT_THETA)  # the best model's evaluation cache size
        t0 = time.perf_counter()
        evaluate_stream(trainer.model, corpus.valid, 4032, "cpu", cache=cache)
        eval_cache_tok_s = eval_tokens / (time.perf_counter() - t0)
    fr = WT103_TEST_BINS
    return {
        "case": name, "amp": amp, "params": count_parameters(trainer.model), "batch": batch, "chunk_len": chunk,
        "segment_len": cfg.segment_len, "dropout": cfg.dropout, "train_steps": steps, "warmup_steps": warmup,
        "train_page_faults_per_step": faults, "train_seconds": train_s,
        "train_tokens_per_s_median_step": batch * chunk / float(np.median(step_s)),
        "train_tokens_per_s": train_tok_s, "eval_tokens_per_s": eval_tok_s,
        "eval_cache3000_tokens_per_s": eval_cache_tok_s, "eval_cache3000_time_ratio": eval_tok_s / eval_cache_tok_s,
        "train_gflop_per_token": 3 * forward_flops_per_token(cfg, fr, all_tails=False) / 1e9,
        "eval_gflop_per_token": forward_flops_per_token(cfg, fr, all_tails=False) / 1e9,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "throughput.json")
    ap.add_argument("--cases", default="8.3M,wt2_default")
    ap.add_argument("--amp", default="none,bf16", help="precisions, comma-separated: none (fp32), bf16")
    ap.add_argument("--batch", type=int, help="training batch instead of the case's (quick looks only)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=20.0, help="time training for at least this long")
    args = ap.parse_args()
    torch.manual_seed(0)
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            for amp in args.amp.split(","):
                before = matmul_rates()
                row = bench_case(name, args.steps, args.warmup, args.min_seconds, Path(tmp), amp, args.batch)
                after = matmul_rates()
                row["matmul_gflops"] = {"before": before, "after": after}
                rate = "bf16" if amp == "bf16" else "fp32"  # MFU against the rate of the row's own precision
                for kind in ("train", "eval"):
                    achieved = row[f"{kind}_tokens_per_s"] * row[f"{kind}_gflop_per_token"]
                    row[f"{kind}_gflops"] = achieved
                    row[f"{kind}_mfu"] = achieved / ((before[rate] + after[rate]) / 2)
                    row[f"{kind}_mfu_vs_max"] = achieved / max(before[rate], after[rate])
                row["peak_rss_mb_so_far"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__},
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cases": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["machine"]), file=sys.stderr)


if __name__ == "__main__":
    main()
