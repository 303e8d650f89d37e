"""Cache local search: seconds per (lambda, theta) candidate vs. one full evaluation pass with the cache.

    python bench/cache_search.py [--name wt2_8.3M] [--tokens 0] [--n-cache 2000] [--threads 0] [--out FILE]

A candidate of the search is scored from hidden states and model log-probs computed once
(``micronet.model.cache_search.CacheObjective``); the alternative is re-running the network with
``evaluate_stream(..., cache=EvalCache(n, lambda, theta))`` per candidate. Both are timed in one
process on the same tokens (the first ``--tokens`` of WikiText-2 validation, 0 = all), and the
perplexities of both ways are compared at every timed candidate. Needs a trained run (default
``results/wt2_8.3M``); a random 8.3M-shaped model is used with ``--name random``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from micronet.compress.checkpoint import load_model
from micronet.data.corpus import DataConfig, load_corpus
from micronet.model.cache import EvalCache
from micronet.model.cache_search import CacheObjective, hidden_states
from micronet.model.evaluation import evaluate_stream
from micronet.model.transformer import ModelConfig, TransformerLM
from micronet.runs.results import RunDir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="wt2_8.3M")
    ap.add_argument("--tokens", type=int, default=0)
    ap.add_argument("--n-cache", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--chunk-len", type=int, default=4032)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "cache_search.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = load_corpus(DataConfig())
    tokens = corpus.valid if not args.tokens else corpus.valid[: args.tokens + 1]
    if args.name == "random":
        torch.manual_seed(0)
        model = TransformerLM(ModelConfig(vocab_size=corpus.vocab_size, cutoffs=[3500, 15000], bin_dims=[256, 64, 16]))
    else:
        model, _ = load_model(RunDir(args.name), None)
    model.eval()

    t0 = time.perf_counter()
    h, lp_model, target = hidden_states(model, tokens, args.chunk_len)
    objective = CacheObjective(h, target, lp_model, args.n_cache)
    setup_s = time.perf_counter() - t0

    candidates = [(0.25, 0.008), (0.30, 0.008), (0.28, 0.0075), (0.20, 0.01)]  # new theta, same theta, new, new
    rows, seen_thetas = [], set()
    for lam, theta in candidates:
        t0 = time.perf_counter()
        ppl_search = objective(lam, theta)
        cand_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        nll, n = evaluate_stream(model, tokens, args.chunk_len, "cpu", cache=EvalCache(args.n_cache, lam, theta))
        full_s = time.perf_counter() - t0
        ppl_full = math.exp(nll / n)
        row = {"lambda": lam, "theta": theta, "candidate_s": cand_s, "full_eval_s": full_s,
               "speedup": full_s / cand_s, "ppl_search": ppl_search, "ppl_full_eval": ppl_full,
               "rel_ppl_diff": abs(ppl_search - ppl_full) / ppl_full, "new_theta": theta not in seen_thetas}
        seen_thetas.add(theta)
        rows.append(row)
        print(json.dumps(row), flush=True)
    new_theta = [r for r in rows if r["new_theta"]]  # the costly candidates: an exp pass over the band
    result = {
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "name": args.name, "tokens": len(tokens) - 1, "n_cache": args.n_cache,
        "setup_s": setup_s, "candidates": rows,
        "median_speedup_new_theta": sorted(r["speedup"] for r in new_theta)[len(new_theta) // 2],
        "max_rel_ppl_diff": max(r["rel_ppl_diff"] for r in rows),
        "break_even_candidates": setup_s / (sum(r["full_eval_s"] - r["candidate_s"] for r in rows) / len(rows)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "candidates"}))


if __name__ == "__main__":
    main()
