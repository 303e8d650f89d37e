"""Training speed of the default job under three allocator set-ups, alternated on one machine.

    python bench/allocator.py [--rounds 4] [--steps 100] [--concurrent] [--threads N] [--out bench/out/allocator.json]

Runs ``python -m micronet.train train.steps=<steps>`` (the default job, shortened; validation on the
first 1,000 valid tokens only, which the figure does not include) as a fresh run per process, rotating
the order of the variants every round so that a change in the machine's load hits all of them:

* ``default``: glibc's default malloc (``MICRONET_MALLOPT=0``, no ``GLIBC_TUNABLES``);
* ``tunables``: ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736``;
* ``mallopt``: no variable; the stage calls ``mallopt`` itself at start-up (:mod:`micronet.runs.allocator`).

``--concurrent`` starts the variants of a round at the same time instead (a machine so loaded that
one run takes minutes then gives each the same conditions; ``--threads 1`` keeps them from
oversubscribing each other). The figure is the stage's own training tokens/s (``train_results.csv``,
timed over the training steps).
Reports the median per variant and the per-round ratios to ``tunables`` (the shared machine's speed moves
20% between runs; a ratio within one round is the fair comparison).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
VARIANTS = {"default": {"MICRONET_MALLOPT": "0"}, "tunables": {"GLIBC_TUNABLES": TUNABLES}, "mallopt": {}}


def start(variant: str, steps: int, threads: int, root: Path) -> subprocess.Popen:
    """Start one fresh default job of ``steps`` steps."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MICRONET_MALLOPT")}
    env.update(VARIANTS[variant], MICRONET_RESULTS=str(root), PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "micronet.train", f"train.steps={steps}", "train.val_tokens=1000",
                             f"train.threads={threads}"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def tokens_per_s(proc: subprocess.Popen, root: Path) -> float:
    """Wait for a job; its training tokens/s."""
    _, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"a training run failed: {err[-2000:]}")
    with open(root / "wt2_default" / "train_results.csv", newline="") as f:
        return float(list(csv.DictReader(f))[-1]["tokens_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--concurrent", action="store_true", help="run the variants of a round at the same time")
    ap.add_argument("--threads", type=int, default=0, help="train.threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "allocator.json")
    args = ap.parse_args()
    names = list(VARIANTS)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="micronet_alloc_") as tmp:
        for r in range(args.rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            roots = {v: Path(tmp) / f"{v}_{r}" for v in order}
            if args.concurrent:
                procs = {v: start(v, args.steps, args.threads, roots[v]) for v in order}
                row = {v: tokens_per_s(procs[v], roots[v]) for v in order}
            else:
                row = {v: tokens_per_s(start(v, args.steps, args.threads, roots[v]), roots[v]) for v in order}
            rounds.append({"order": order, "tokens_per_s": row})
            print(f"round {r + 1}: " + ", ".join(f"{v} {row[v]:,.0f}" for v in names), flush=True)
    med = {v: statistics.median(x["tokens_per_s"][v] for x in rounds) for v in names}
    ratios = {v: [x["tokens_per_s"][v] / x["tokens_per_s"]["tunables"] for x in rounds] for v in names}
    out = {"steps": args.steps, "concurrent": args.concurrent, "threads": args.threads, "rounds": rounds,
           "median_tokens_per_s": med,
           "ratio_to_tunables": {v: {"per_round": r, "median": statistics.median(r)} for v, r in ratios.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for v in names:
        print(f"{v:9s} median {med[v]:8,.0f} tok/s, {statistics.median(ratios[v]):.3f}x tunables "
              f"(rounds: {', '.join(f'{x:.3f}' for x in ratios[v])})")


if __name__ == "__main__":
    main()
