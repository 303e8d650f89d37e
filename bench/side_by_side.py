"""This tree against a pinned reference commit, alternated in one run: training and batch-1 evaluation
tokens/s in fp32 and bf16, peak RSS, and their ratios to the reference's fp32.

    python bench/side_by_side.py [--ref-commit 640791f] [--cases 8.3M,wt2_default] [--rounds 2] [--out FILE]

Absolute speeds move ~20% between runs on a shared machine, so each figure is a ratio of runs made
minutes apart: for every case and round, ``bench/throughput.py`` (this tree's harness) runs once per
variant, each in its own process (its own peak RSS), alternating ours-fp32, ours-bf16, ref-fp32, so a
drift of the machine's load hits every variant. The reference is the library of ``--ref-commit``
(``git archive`` into a temporary folder, imported through ``PYTHONPATH``); the harness only uses the
library's public API, which that commit has too. Reported per case: each variant's median over rounds,
the per-round ratios ours / ref-fp32 and their median, and the fp32/bf16 matmul rates around every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIGURES = ("train_tokens_per_s", "eval_tokens_per_s", "eval_cache3000_tokens_per_s", "peak_rss_mb_so_far")
# variant: (library, precision); the reference runs in fp32 only (its targets are against its fp32 code)
VARIANTS = {"ours_fp32": ("ours", "none"), "ours_bf16": ("ours", "bf16"), "ref_fp32": ("ref", "none")}


def export_commit(commit: str, dest: Path) -> Path:
    """The ``micronet`` package of ``commit`` under ``dest`` (read-only use), via ``git archive``."""
    archive = dest / "ref.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), commit, "micronet", "conf"],
                   check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest


def run_variant(case: str, lib: Path, amp: str, args: argparse.Namespace, out: Path) -> dict:
    """One throughput.py row for ``case`` at precision ``amp`` with the library at ``lib``."""
    env = {**os.environ, "PYTHONPATH": str(lib)}
    cmd = [sys.executable, str(HERE / "throughput.py"), "--cases", case, "--amp", amp, "--out", str(out),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--min-seconds", str(args.min_seconds),
           *(["--batch", str(args.batch)] if args.batch else [])]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd=str(lib))
    return json.loads(out.read_text())["cases"][0]


def summarise(case: str, runs: dict[str, list[dict]]) -> dict:
    """Medians per variant and the per-round ratios of ours to the reference's fp32."""
    out: dict = {"case": case, "rounds": len(runs["ref_fp32"])}
    for v, rows in runs.items():
        out[v] = {f: statistics.median(r[f] for r in rows) for f in FIGURES}
        out[v]["train_mfu"] = statistics.median(r["train_mfu"] for r in rows)
        out[v]["matmul_gflops"] = [r["matmul_gflops"] for r in rows]
    for v in ("ours_fp32", "ours_bf16"):
        for f in FIGURES:
            per_round = [a[f] / b[f] for a, b in zip(runs[v], runs["ref_fp32"])]
            out[f"{v}_vs_ref_fp32_{f}"] = {"per_round": per_round, "median": statistics.median(per_round)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref-commit", default="640791f")
    ap.add_argument("--cases", default="8.3M,wt2_default")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--min-seconds", type=float, default=20.0)
    ap.add_argument("--batch", type=int, help="training batch instead of each case's (quick looks only)")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "side_by_side.json")
    args = ap.parse_args()
    result: dict = {"ref_commit": args.ref_commit, "batch_override": args.batch, "variants": {k: list(v) for k, v in VARIANTS.items()},
                    "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"ours": ROOT, "ref": export_commit(args.ref_commit, Path(tmp))}
        for case in args.cases.split(","):
            runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
            for r in range(args.rounds):
                for v, (lib, amp) in VARIANTS.items():
                    runs[v].append(run_variant(case, libs[lib], amp, args, Path(tmp) / f"{v}.json"))
                    row = runs[v][-1]
                    print(f"{case} round {r + 1} {v}: train {row['train_tokens_per_s']:,.0f} tok/s, eval "
                          f"{row['eval_tokens_per_s']:,.0f} / cache {row['eval_cache3000_tokens_per_s']:,.0f} tok/s, "
                          f"peak RSS {row['peak_rss_mb_so_far']:,.0f} MB", file=sys.stderr, flush=True)
            result["cases"].append(summarise(case, runs))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["cases"], indent=1))


if __name__ == "__main__":
    main()
