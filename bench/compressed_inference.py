"""Inference speed, memory and perplexity of the compressed model's variants, side by side.

    python bench/compressed_inference.py [--threads 1] [--tokens 40000] [--repeats 3] [--full]

Variants (WikiText-2 lineage): ``dense`` (the fp32 parent's parent, wt2_8.3M step 1000, as the project evaluates
it; ``--dense copy``: a dense fp32 TransformerLM holding the quantized model's weights, the same architecture and
work, for a checkout without that checkpoint), ``pruned`` (fp32, prune0.358_wt2_8.3M step 300), ``fake_quant``
(the quantize run's packed export, packed.safetensors or a legacy model.mnq, via micronet.compress.checkpoint.load_export: the
quantize stage's evaluation path), ``fast_fp32`` and ``fast_int8`` (micronet.compress.fast_infer.build_fast_model of the
same file, default settings: torch.int8 codes, torch._int_mm), and two controls that split the fast path's gain:
``dense_seg32`` (the dense model with the fast path's attention block length alone) and ``fast_int8_seg96`` (int8
with the model's own blocks).

* Speed: batch-1 online evaluation (micronet.model.evaluation.evaluate_stream, memory carried, chunk 4032), without
  and with the evaluation cache (n 2000, each run's searched lambda/theta), on the first ``--tokens`` tokens of
  the WikiText-2 valid split. All models live in this process and are timed in interleaved rounds (each
  variant once per round) so a busy machine slows them alike; best and median tokens/s are reported, per
  wall-clock second and per CPU second of this process (time.process_time: on a machine shared with other jobs
  it leaves out the time the scheduler gave them; with --threads 2 it sums both threads, so use wall there).
* Perplexity on the same tokens (deterministic: every round gives the same figure), and with ``--full`` on the
  whole valid and test splits with the cache.
* Memory: each variant in its own subprocess (``--rss-child``): VmRSS after imports and data, VmHWM while
  building the model, VmRSS with the model built (after gc + malloc_trim), then VmHWM of one cached
  evaluation of the slice (peak reset through /proc/self/clear_refs before it).
* The machine: torch version, threads, fp32 GEMM and int8 Linear (micronet.compress.fast_infer.Int8Linear, quantizing
  its input per call) rates before and after.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from micronet.model.cache import eval_cache_for
from micronet.data.corpus import DataConfig, load_corpus
from micronet.compress.checkpoint import load_model
from micronet.model.evaluation import evaluate_stream
from micronet.compress.checkpoint import load_export
from micronet.compress.fast_infer import DEFAULT_SEGMENT_LEN, build_fast_model, int8_linear, plain_copy
from micronet.runs.results import RunDir

VARIANTS = ("dense", "dense_seg32", "pruned", "fake_quant", "fast_fp32", "fast_int8_seg96", "fast_int8")
QUANT_RUN = "quantize_prune0.358_wt2_8.3M_step300_cache2000_bits9"


def build(variant: str, args: argparse.Namespace) -> tuple[torch.nn.Module, RunDir, int]:
    """The model of ``variant`` and the run/step whose searched cache parameters it uses."""
    export = RunDir(args.quant_run).export_path
    if variant in ("dense", "dense_seg32") and args.dense == "copy":  # the quantized weights in a dense fp32 model
        model = plain_copy(load_export(export), segment_len=32 if variant == "dense_seg32" else None)
        return model, RunDir(args.quant_run), 1
    if variant in ("dense", "dense_seg32", "pruned"):
        name, step = (args.pruned if variant == "pruned" else args.dense).split(":")
        model, _ = load_model(RunDir(name), int(step))
        if variant == "dense_seg32":  # control: the fast path's attention blocking alone, fp32 dense model
            model = plain_copy(model, segment_len=32)
        return model.eval(), RunDir(name), int(step)
    if variant == "fake_quant":
        model = load_export(export)
    elif variant == "fast_fp32":
        model = build_fast_model(export, backend="fp32")
    else:  # fast_int8 (default blocking) or fast_int8_seg96 (the model's own)
        model = build_fast_model(export, backend="int8",
                                 segment_len=None if variant.endswith("seg96") else DEFAULT_SEGMENT_LEN)
    return model, RunDir(args.quant_run), 1  # a calibrated quantize run holds step 1


def status_mb() -> dict[str, float]:
    """VmRSS and VmHWM of this process, MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, val = line.split(":")
            out[key] = int(val.split()[0]) / 1024
    return out


def rss_child(args: argparse.Namespace, tokens: np.ndarray) -> dict:
    """Memory of one variant (run in a fresh process)."""
    base = status_mb()["VmRSS"]
    model, rd, step = build(args.rss_child, args)
    build_peak = status_mb()["VmHWM"]
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed load-time buffers back to the OS
    with_model = status_mb()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (and ru_maxrss) to the current RSS
    cache, _ = eval_cache_for(rd, step, args.n_cache, model)
    evaluate_stream(model, tokens, args.chunk, cache=cache)
    return {"variant": args.rss_child, "rss_base_mb": base, "build_peak_mb": build_peak, "rss_model_mb": with_model,
            "eval_peak_mb": status_mb()["VmHWM"], "model_mb": with_model - base,
            "eval_growth_mb": status_mb()["VmHWM"] - base}


def gemm_rates(n: int = 2048, seconds: float = 2.0) -> dict[str, float]:
    """Sustained fp32 GEMM GFLOP/s and int8 Linear GOP/s (2 ops per multiply-add, input quantized per call),
    n x n x n."""
    a, w = torch.randn(n, n), torch.randn(n, n)
    q = int8_linear(w, None)
    out = {}
    for key, fn in (("fp32_gflops", lambda: a @ w), ("int8_gops", lambda: q(a))):
        for _ in range(2):
            fn()
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn()
            reps += 1
        out[key] = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
    return out


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers (the int8 layers' codes, scales and biases are buffers)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "compressed_inference.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=40000, help="predicted tokens: the first N+1 of the valid split")
    ap.add_argument("--chunk", type=int, default=4032)
    ap.add_argument("--n-cache", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--dense", default="wt2_8.3M:1000", help="run:step, or 'copy' (the quantized weights, dense fp32)")
    ap.add_argument("--pruned", default="prune0.358_wt2_8.3M:300")
    ap.add_argument("--quant-run", default=QUANT_RUN)
    ap.add_argument("--full", action="store_true", help="also the full valid and test ppl (cache) of --full-variants")
    ap.add_argument("--full-variants", default="fake_quant,fast_int8")
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    corpus = load_corpus(DataConfig())
    tokens = corpus.valid[: args.tokens + 1]
    if args.rss_child:
        print(json.dumps(rss_child(args, tokens)))
        return
    variants = args.variants.split(",")
    rss = {}
    if not args.no_rss:
        for v in variants:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--rss-child", v]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rss[v] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(rss[v]), flush=True)
    rates_before = gemm_rates()
    models = {v: build(v, args) for v in variants}
    caches = {v: eval_cache_for(rd, step, args.n_cache, m) for v, (m, rd, step) in models.items()}
    times: dict[str, dict[str, list[float]]] = {v: {"none": [], "cache": []} for v in variants}
    cpu: dict[str, dict[str, list[float]]] = {v: {"none": [], "cache": []} for v in variants}
    nll: dict[str, dict[str, float]] = {v: {} for v in variants}
    for v, (m, _, _) in models.items():  # warm-up: allocator, kernels, packed weights
        evaluate_stream(m, tokens[: args.chunk + 1], args.chunk, desc=v)
    for r in range(args.repeats):
        for v, (m, _, _) in models.items():
            for mode in ("none", "cache"):
                cache = caches[v][0] if mode == "cache" else None
                t0, c0 = time.perf_counter(), time.process_time()
                total, n = evaluate_stream(m, tokens, args.chunk, desc=f"{v} {mode}", cache=cache)
                times[v][mode].append(time.perf_counter() - t0)
                cpu[v][mode].append(time.process_time() - c0)
                if mode in nll[v] and nll[v][mode] != total:
                    print(f"warning: {v} {mode} nll changed between rounds", file=sys.stderr)
                nll[v][mode] = total
            print(f"round {r}: {v} " + ", ".join(f"{k} {n / t[-1]:,.0f} tok/s ({n / cpu[v][k][-1]:,.0f} per CPU s)"
                                                 for k, t in times[v].items()), flush=True)
    rates_after = gemm_rates()
    rows, n = {}, len(tokens) - 1
    for v, (m, _, _) in models.items():
        row = {"param_bytes": param_bytes(m), "eval_cache": caches[v][1]}
        for mode in ("none", "cache"):
            ts, cs = times[v][mode], cpu[v][mode]
            row[mode] = {"ppl": math.exp(nll[v][mode] / n), "tokens_per_s_best": n / min(ts),
                         "tokens_per_s_median": n / statistics.median(ts), "tokens_per_cpu_s_best": n / min(cs),
                         "tokens_per_cpu_s_median": n / statistics.median(cs), "seconds": ts, "cpu_seconds": cs}
        if v in rss:
            row["memory"] = rss[v]
        rows[v] = row
    ref = rows.get("dense")
    fq = rows.get("fake_quant")
    for v, row in rows.items():
        for mode in ("none", "cache"):
            if ref:
                for key in ("tokens_per_s_best", "tokens_per_s_median", "tokens_per_cpu_s_best",
                            "tokens_per_cpu_s_median"):
                    row[mode][f"speedup_vs_dense_{key[7:]}"] = row[mode][key] / ref[mode][key]
            if fq:
                row[mode]["ppl_vs_fake_quant"] = row[mode]["ppl"] / fq[mode]["ppl"] - 1
    full = {}
    if args.full:
        for v in args.full_variants.split(","):
            m, rd, step = models[v]
            full[v] = {}
            for split in ("valid", "test"):
                total, k = evaluate_stream(m, corpus.split(split), args.chunk, desc=f"{v} {split}", cache=caches[v][0])
                full[v][split] = {"ppl": math.exp(total / k), "tokens": k}
            print(json.dumps({v: full[v]}), flush=True)
    result = {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "int8_kernel": "torch._int_mm",
                          "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
                          "gemm_before": rates_before, "gemm_after": rates_after},
              "protocol": {"split": "valid", "tokens": n, "chunk_len": args.chunk, "n_cache": args.n_cache,
                           "repeats": args.repeats, "quant_run": args.quant_run, "dense": args.dense,
                           "pruned": args.pruned},
              "variants": rows, "full_splits": full}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for v, r in rows.items():
        print(v, {m: {k: round(r[m][k], 3) for k in ("ppl", "tokens_per_s_best", "tokens_per_cpu_s_best",
                                                      "speedup_vs_dense_per_s_best", "speedup_vs_dense_per_cpu_s_best")
                      if k in r[m]} for m in ("none", "cache")})
    print(json.dumps(result["machine"]), file=sys.stderr)


if __name__ == "__main__":
    main()
