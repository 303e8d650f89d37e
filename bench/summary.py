"""Every performance figure of the project in one run: each bench script in turn, with the machine's
fp32 and bf16 matmul rates measured right before and right after it, gathered into one table.

    python bench/summary.py [--only throughput,cache_search] [--out bench/out/summary.json] [--md FILE]

Each bench runs in its own subprocess (its own peak RSS, nothing left over from the one before) and
writes its JSON next to this summary (``bench/out/<bench>.json``); this process only measures the
matmul rate between them and reads the JSON back. The markdown table (stdout, and ``--md``) has one
row per figure: value, target where the project has one, and the matmul rate around its bench, so a
figure can be read against how fast this (noisy, shared) machine was at that moment. ``throughput`` gives
every case in fp32 and bf16 (MFU against the matching matmul rate); ``side_by_side`` gives the ratios to
the pinned reference commit (issue 16's targets), alternated in the same run. A bench that
fails (e.g. ``compressed_inference`` without the WikiText-2 lineage's checkpoints) is reported as
failed with its last error line; the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from throughput import matmul_rates  # noqa: E402

HERE = Path(__file__).resolve().parent
# name: command-line arguments (besides --out); the settings the README's speed section quotes
BENCHES: dict[str, list[str]] = {
    "throughput": ["--cases", "8.3M,wt2_default,wt2_8.3M", "--amp", "none,bf16", "--steps", "10", "--warmup", "6",
                   "--min-seconds", "30"],
    "side_by_side": ["--ref-commit", "640791f", "--cases", "8.3M,wt2_default", "--rounds", "2"],
    "softmax": ["--reps", "3"],
    "attention": [],
    "eval_cache": [],
    "cache_search": ["--tokens", "40000"],
    "compressed_inference": ["--threads", "2", "--repeats", "3"],
    "memory": ["--steps", "3"],
}

Row = tuple[str, str, str]  # figure, value, target


def _throughput(d: dict) -> list[Row]:
    targets = {"8.3M": ">= 55%", "wt2_default": ">= 45%"}
    rows = []
    for c in d["cases"]:
        n, amp = c["case"], "bf16" if c.get("amp") == "bf16" else "fp32"
        rows += [
            (f"train MFU, {n}, {amp} (vs the {amp} matmul rate)",
             f"{c['train_mfu']:.1%} ({c['train_mfu_vs_max']:.1%} vs the higher rate)", targets.get(n, "") if amp == "fp32" else ""),
            (f"train tokens/s, {n}, {amp}", f"{c['train_tokens_per_s']:,.0f}", ""),
            (f"batch-1 eval tokens/s, {n}, {amp}", f"{c['eval_tokens_per_s']:,.0f}", ""),
            (f"batch-1 eval tokens/s with cache 3000, {n}, {amp}",
             f"{c['eval_cache3000_tokens_per_s']:,.0f} ({c['eval_cache3000_time_ratio']:.2f}x the time)",
             "original: 1.72x"),
        ]
    return rows


# issue 16's targets, as ratios to the reference commit's fp32 code: (figure key, label, target, lower is better)
SIDE_BY_SIDE_TARGETS = {
    "8.3M": [("train_tokens_per_s", "training tokens/s", ">= 1.67x", False),
             ("eval_cache3000_tokens_per_s", "batch-1 eval tokens/s, cache 3000", ">= 1.38x", False),
             ("eval_tokens_per_s", "batch-1 eval tokens/s, no cache", ">= 1.85x", False),
             ("peak_rss_mb_so_far", "training peak RSS", "<= 0.65x", True)],
    "wt2_default": [("train_tokens_per_s", "training tokens/s", ">= 1.5x", False)],
}


def _side_by_side(d: dict) -> list[Row]:
    rows = []
    for c in d["cases"]:
        n = c["case"]
        for key, label, target, _ in SIDE_BY_SIDE_TARGETS.get(n, SIDE_BY_SIDE_TARGETS["wt2_default"]):
            ref, fp32, bf16 = (c[v][key] for v in ("ref_fp32", "ours_fp32", "ours_bf16"))
            r32, r16 = (c[f"{v}_vs_ref_fp32_{key}"] for v in ("ours_fp32", "ours_bf16"))
            unit = "MB" if key.startswith("peak_rss") else "tok/s"
            rows.append((f"{label}, {n}: ours bf16 / ours fp32 / {d['ref_commit']} fp32 ({c['rounds']} rounds)",
                         f"{bf16:,.0f} / {fp32:,.0f} / {ref:,.0f} {unit}: **{r16['median']:.2f}x** bf16 "
                         f"({', '.join(f'{x:.2f}' for x in r16['per_round'])}), {r32['median']:.2f}x fp32", target))
    return rows


def _softmax(d: dict) -> list[Row]:
    return [(f"blocked target log-prob vs log_softmax + gather, {c['case']}", f"{c['speedup']:.2f}x", "")
            for c in d["cases"]]


def _attention(d: dict) -> list[Row]:
    rows = []
    for c in d["cases"]:
        rows.append((f"band attention layer fwd+bwd vs autograd/SDPA, {c['case']}", f"{c['attention_speedup']:.2f}x", ""))
        if "dropout_speedup" in c:
            rows.append((f"hash dropout vs F.dropout, {c['case']}", f"{c['dropout_speedup']:.2f}x", ""))
    return rows


def _eval_cache(d: dict) -> list[Row]:
    keys = [k for k in ("time_ratio_paired", "time_ratio_cache_over_no_cache") if k in d]
    return [(f"eval cache {d.get('n_cache', 3000)} cost ({k})", f"{d[k]:.2f}x the time", "< 2x") for k in keys]


def _cache_search(d: dict) -> list[Row]:
    new = [c for c in d["candidates"] if c.get("new_theta", True)]
    c = new[0] if new else d["candidates"][0]
    return [
        (f"cache search, s per candidate vs full pass ({d['name']}, n {d['n_cache']}, {d['tokens']:,} tokens)",
         f"{c['candidate_s']:.3f} s vs {c['full_eval_s']:.2f} s: {d['median_speedup_new_theta']:.0f}x", ">= 10x"),
        ("cache search, max relative ppl difference vs full pass", f"{d['max_rel_ppl_diff']:.1e}", "identical"),
    ]


def _compressed(d: dict) -> list[Row]:
    v = d["variants"]
    dense, fast, fake = v["dense"], v["fast_int8"], v["fake_quant"]
    rows = []
    for mode, label in (("none", "no cache"), ("cache", f"cache {d['protocol']['n_cache']}")):
        rows.append((f"compressed int8 vs dense fp32 batch-1 tokens/s, {label}",
                     f"{fast[mode]['tokens_per_s_best']:,.0f} vs {dense[mode]['tokens_per_s_best']:,.0f}: "
                     f"{fast[mode]['speedup_vs_dense_per_s_best']:.2f}x", ">= 1.5x"))
        rows.append((f"compressed int8 ppl vs fake-quantized, {label}",
                     f"{fast[mode]['ppl']:.3f} vs {fake[mode]['ppl']:.3f} ({fast[mode]['ppl_vs_fake_quant']:+.3%})",
                     "within 0.1%"))
    if "memory" in fast:
        rows.append(("compressed int8 vs dense fp32 eval peak RSS",
                     f"{fast['memory']['eval_peak_mb']:,.0f} vs {dense['memory']['eval_peak_mb']:,.0f} MB", ""))
    return rows


def _memory(d: dict) -> list[Row]:
    rows = [(f"peak RSS, {c['case']} (batch {c['batch']} x {c['chunk_len']})", f"{c['peak_rss_mb']:,.0f} MB", "")
            for c in d["cases"]]
    if d.get("distill_rss_ratio"):
        rows.append(("peak RSS, distillation with soft labels vs without", f"{d['distill_rss_ratio']:.2f}x", ""))
    return rows


ROWS: dict[str, Callable[[dict], list[Row]]] = {
    "throughput": _throughput, "softmax": _softmax, "attention": _attention, "eval_cache": _eval_cache,
    "cache_search": _cache_search, "compressed_inference": _compressed, "memory": _memory,
    "side_by_side": _side_by_side,
}


def run_bench(name: str, out_dir: Path) -> dict:
    """Run one bench in a subprocess between two matmul measurements; its JSON, rows, rates and seconds."""
    out = out_dir / f"{name}.json"
    before = matmul_rates()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *BENCHES[name], "--out", str(out)],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    after = matmul_rates()
    entry: dict = {"bench": name, "args": BENCHES[name], "seconds": seconds,
                   "matmul_gflops": {"before": before, "after": after}}
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        entry["error"] = lines[-1] if lines else f"exit {proc.returncode}"
        return entry
    entry["rows"] = ROWS[name](json.loads(out.read_text()))
    return entry


def markdown(entries: list[dict]) -> str:
    """One row per figure, with the matmul rates measured around the bench it comes from."""
    lines = ["| figure | measured | target | matmul GFLOP/s fp32, bf16 (before / after) |", "|---|---|---|---|"]
    for e in entries:
        b, a = e["matmul_gflops"]["before"], e["matmul_gflops"]["after"]
        rate = f"{b['fp32']:.0f} / {a['fp32']:.0f}, {b['bf16']:.0f} / {a['bf16']:.0f}"
        if "error" in e:
            lines.append(f"| {e['bench']} | failed: {e['error']} | | {rate} |")
        for fig, value, target in e.get("rows", []):
            lines.append(f"| {fig} | {value} | {target} | {rate} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(BENCHES), help="comma-separated benches, in this order")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "summary.json")
    ap.add_argument("--md", type=Path, help="also write the markdown table here")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(BENCHES))
    if unknown:
        ap.error(f"unknown bench(es) {unknown}; choose from {list(BENCHES)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    entries = []
    for name in names:
        print(f"running bench/{name}.py ...", file=sys.stderr, flush=True)
        entries.append(run_bench(name, args.out.parent))
        print(f"  {entries[-1]['seconds']:.0f} s" + (f", failed: {entries[-1]['error']}" if "error" in entries[-1] else ""),
              file=sys.stderr, flush=True)
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__,
              "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "benches": entries}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(entries)
    if args.md:
        args.md.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
