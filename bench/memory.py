"""Peak resident memory of training: the 8.3M configuration, and distillation with soft labels mapped vs. without.

    python bench/memory.py [--steps 3] [--amp none] [--teacher wt2_8.3M] [--out bench/out/memory.json]

Each case runs in its own subprocess (``--child CASE``) and reports its own peak RSS
(``ru_maxrss``) after a few training steps, so the cases cannot inflate each other's figure. ``--amp``
(none, bf16; default none: exact fp32) is the training precision of every case:

* ``train_8.3M``: the original 8.3M (vocab 267,735), batch 14 x 1152, synthetic tokens.
* ``wt2_small`` / ``distill_wt2_small``: the WikiText-2 student, batch 8 x 256, alone and with the
  teacher's top-30 soft labels read through the memory map (needs ``results/<teacher>/soft_labels``,
  made by ``python -m micronet.soft_labels name=<teacher>``). Their ratio is the soft labels' RAM cost.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def child(case: str, steps: int, teacher: str, amp: str = "none") -> dict:
    from micronet.data.corpus import Corpus, DataConfig, load_corpus
    from micronet.training.distill import build_distiller
    from micronet.model.transformer import ModelConfig
    from micronet.runs.results import RunDir
    from micronet.training.config import OptimConfig, TrainConfig
    from micronet.training.trainer import Trainer

    if case == "train_8.3M":
        sys.path.insert(0, str(Path(__file__).parent))
        from throughput import CASES, model_config, synthetic_tokens

        cfg, (batch, chunk) = model_config("8.3M"), CASES["8.3M"][2:4]
        tokens = synthetic_tokens(cfg, 400_000)
        corpus = Corpus(vocab=[str(i) for i in range(cfg.vocab_size)], train=tokens, valid=tokens[:1001],
                        test=tokens[:1001], manifest={"vocab_size": cfg.vocab_size})
    else:
        corpus = load_corpus(DataConfig())
        cfg = ModelConfig(vocab_size=corpus.vocab_size, d_model=128, n_layer=4, n_head=4, d_head=32, d_ff=512,
                          n_seq=64, segment_len=64, cutoffs=[2000, 10000], bin_dims=[128, 32, 8], dropout=0.1)
        batch, chunk = 8, 256
    tcfg = TrainConfig(steps=1000, batch_size=batch, chunk_len=chunk, device="cpu", amp=amp)
    trainer = Trainer(RunDir("mem", Path(tempfile.mkdtemp())), tcfg, OptimConfig(warmup_steps=10), cfg, None, corpus, {})
    if case == "distill_wt2_small":
        trainer.distill = build_distiller({"teacher": teacher}, corpus)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return {"case": case, "amp": amp, "steps": steps, "batch": batch, "chunk_len": chunk, "seconds": time.perf_counter() - t0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--teacher", default="wt2_8.3M")
    ap.add_argument("--cases", default="train_8.3M,wt2_small,distill_wt2_small")
    ap.add_argument("--amp", default="none", choices=["none", "bf16"])
    ap.add_argument("--child")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "memory.json")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.teacher, args.amp)))
        return
    rows = []
    for case in args.cases.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", case, "--steps", str(args.steps),
                              "--teacher", args.teacher, "--amp", args.amp], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__, "cases": rows}
    by = {r["case"]: r["peak_rss_mb"] for r in rows}
    if {"wt2_small", "distill_wt2_small"} <= by.keys():
        result["distill_rss_ratio"] = by["distill_wt2_small"] / by["wt2_small"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "cases"}))


if __name__ == "__main__":
    main()
