"""Reproduce the original MicroNet entry's published scores with micronet.score (spec section 8).

    python bench/reproduce_paper_score.py [--out FILE] [--table]

Prints one JSON line per case (case, convention, params, ops, muls, mul_ops, adds, others, score);
``--out`` also writes them as a JSON list, ``--table`` prints each case's per-component table to stderr.

All cases use the original 8.3M architecture, ``ModelConfig(vocab_size=267735)``, and the WikiText-103
test-set bin fractions 198232 / 35479 / 11858 of 245,569.

* ``best``: the 0.358 schedule (0.75 x the section-9 final sparsities; ops from those densities exactly,
  storage from round-half-up nonzeros per tensor), 9 bits, 57 activation quantizers, cache 3000.
  Ops 8,806,961; the spec's table says 8,806,715: see the note below.
* ``best_measured``: as ``best`` with storage from the checkpoint's measured 5,326,376 nonzeros of
  8,296,021: params = 5,326,376 x 9/32 (values) + 8,296,021/32 (masks) + 57 x (1 + 23/32)
  (activation quantizers: range + 23-bit inverse scale) = 1,498,043.25 + 259,250.65625 + 97.96875.
* ``submission3_dense``: 8 bits, cache 2000, ops counted dense, storage from 5,487,556 nonzeros of
  8,296,023 (the 2 extra values are the cache's lambda and theta, stored but not masked).
* ``dense_fp32_cache0`` / ``dense_fp32_cache2000``: unquantized, no activation quantizers.
* ``*_strict``: the same models under the strict convention. The two measured-total cases have no
  strict twin: a total nonzero count cannot say which tensors are sparse or fp32.

Note on 8,806,961 vs the spec's 8,806,715 (best): the difference is 246 adds and nothing else (the
muls, 6,301,457, and the others, 845,247, agree). Our adds are 6,189,429.55; 6,189,429.55 - 246 =
6,189,183.55, which the spec truncates to 6,189,183 (and 8,806,715.2 to 8,806,715). A bias that is
zero removes one add and no multiply, so the spec's figure counts bias adds with the measured bias
densities of the quantized checkpoint, in which 246 never-pruned bias values (qkv / FFN / head biases)
round to zero at 9 bits; the yaml targets treat those biases as dense. The checkpoint's nonzeros are
short of the targets by about the same amount (5,326,376 vs 5,326,622.26), and the original's
submission-1 notebook shows the same effect (about 250 zero biases at 9 bits).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from micronet.compress.schedules import final_densities  # noqa: E402
from micronet.model.transformer import ModelConfig  # noqa: E402
from micronet.scoring.counts import WT103_TEST_BIN_FRACTIONS, ModelCounts, render_table, score  # noqa: E402
from micronet.scoring.rules import Score  # noqa: E402

ORIGINAL = ModelConfig(vocab_size=267735)


def cases() -> dict[str, Score]:
    """Every case, in print order."""
    best = ModelCounts.from_config(ORIGINAL, final_densities("0.358"))
    dense = ModelCounts.from_config(ORIGINAL)
    q9 = dict(bits=9, act_bits=9, n_act_quantizers=57, n_cache=3000, bin_fractions=WT103_TEST_BIN_FRACTIONS)
    fp32 = dict(bits=32, act_bits=32, n_act_quantizers=0, bin_fractions=WT103_TEST_BIN_FRACTIONS)
    out = {
        "best": score(best, **q9),
        "best_measured": score(best.with_measured_nonzeros(5_326_376, 8_296_021), **q9),
        "submission3_dense": score(
            dense.with_measured_nonzeros(5_487_556, 8_296_023), bits=8, act_bits=8, n_act_quantizers=57,
            n_cache=2000, bin_fractions=WT103_TEST_BIN_FRACTIONS,
        ),
        "dense_fp32_cache0": score(dense, n_cache=0, **fp32),
        "dense_fp32_cache2000": score(dense, n_cache=2000, **fp32),
    }
    out["best_strict"] = score(best, convention="strict", **q9)
    out["dense_fp32_cache0_strict"] = score(dense, n_cache=0, convention="strict", **fp32)
    out["dense_fp32_cache2000_strict"] = score(dense, n_cache=2000, convention="strict", **fp32)
    return out


def summary(case: str, s: Score) -> dict:
    """The JSON record printed for one case."""
    return {"case": case, "convention": s.convention, "params": s.params, "ops": s.ops, "muls": s.muls,
            "mul_ops": s.mul_ops, "adds": s.adds, "others": s.others, "score": s.score}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="also write the records as a JSON list to this file")
    ap.add_argument("--table", action="store_true", help="print each case's per-component table to stderr")
    args = ap.parse_args(argv)
    records = []
    for case, s in cases().items():
        rec = summary(case, s)
        records.append(rec)
        print(json.dumps(rec), flush=True)
        if args.table:
            print(f"\n[{case}]\n{render_table(s, group_layers=True)}\n", file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
