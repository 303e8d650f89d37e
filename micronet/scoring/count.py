"""Counting: op records and stored tensors -> a :class:`~micronet.scoring.rules.Score`, per convention.

The records, the rule table (:data:`~micronet.scoring.rules.RULES`) and what each convention means are
in :mod:`micronet.scoring.rules`; this module applies them.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from micronet.scoring.rules import (FC, OPS_BASELINE, PARAMS_BASELINE, ActQuantizers, Cache, Dots, LayerNorm, Op, ReLU,
                                    Residual, Row, Score, Settings, Softmax, TensorCount)


def tensor_storage(t: TensorCount, s: Settings) -> float:
    """32-bit-equivalent storage of one tensor: values + mask + weight scales, per the convention."""
    r = s.rules
    if t.kind == "norm" and not r.count_norm_params:
        return 0.0  # paper: "LayerNorms skipped" (assumed fused into the next FC)
    width = s.w if t.quantized or r.unquantized_width == "weight_bits" else s.fp
    size = t.nonzeros * width / 32
    sparse = t.nonzeros < t.numel
    if t.kind != "scalar" and (r.mask == "every_tensor" or sparse):
        size += t.numel / 32  # 1-bit mask over the full shape
    if r.count_scales and t.quantized and s.bits < 32:
        size += t.n_scales * s.fp / 32
    return size


def count(
    ops: Sequence[Op],
    tensors: Mapping[str, TensorCount],
    settings: Settings,
    total_nonzeros: int | None = None,
) -> Score:
    """Count ``ops`` and the storage of ``tensors`` under ``settings.convention``.

    Each tensor's storage goes to the component of the first op that references it; tensors no op
    references land in a ``stored`` row. ``total_nonzeros`` (paper convention only) replaces the sum of
    per-tensor nonzeros with a measured total; the difference is reported as a ``measured_nonzeros`` row.
    """
    r, w, a, fp = settings.rules, settings.w, settings.a, settings.fp
    widths = {"act": a, "weight": w, "fp": fp}
    rows: dict[str, Row] = {}
    seen: set[str] = set()

    def row(component: str) -> Row:
        return rows.setdefault(component, Row(component))

    def store(component: str, *names: str | None) -> None:
        for n in names:
            if n is None or n in seen:
                continue
            if n not in tensors:
                raise ValueError(f"op {component!r} references unknown tensor {n!r}")
            seen.add(n)
            row(component).params += tensor_storage(tensors[n], settings)

    def mul(component: str, n: float, *inputs: int) -> None:
        width = w if r.mul_width == "weight_bits" else max(inputs)
        row(component).muls += n
        row(component).mul_ops += n * width / 32

    def density(name: str | None) -> float:
        return 0.0 if name is None else tensors[name].density

    for op in ops:
        c = op.component
        row(c)
        if isinstance(op, FC):
            store(c, op.weight, op.bias)
            dw, db = density(op.weight), density(op.bias)
            mul(c, op.rate * dw * op.n_in * op.n_out, widths[op.x], w)
            if r.fc_adds == "paper":
                adds = dw * (op.n_in - 1) * op.n_out
            else:  # counting.py: a dot product of k nonzeros needs k - 1 adds (never fewer than 0)
                adds = max(dw * op.n_in - 1, 0.0) * op.n_out
            row(c).adds += op.rate * (adds + db * op.n_out)
        elif isinstance(op, Dots):
            store(c, op.tensor)
            k = op.heads if r.per_head else 1
            mul(c, k * op.count * op.length, widths[op.x], widths[op.y])
            row(c).adds += k * op.count * (op.length - 1 + op.extra_adds)
        elif isinstance(op, Softmax):
            k = op.heads if r.per_head else 1
            if r.softmax_split:  # n exp + n divisions, n - 1 adds for the normaliser
                row(c).others += k * 2 * op.n * fp / 32
                row(c).adds += k * (op.n - 1)
            else:
                row(c).others += k * (3 * op.n - 1) * fp / 32
        elif isinstance(op, LayerNorm):
            store(c, op.weight, op.bias)
            if r.layernorm == "6d_others":
                row(c).others += 6 * op.d * fp / 32
            else:  # mean: d-1 adds, 1 mul; centre: d subs; var: d squares, d-1 adds, 1 mul; +eps;
                # rsqrt; normalise d muls; gamma d muls; beta d adds
                mul(c, 3 * op.d + 2, fp)
                row(c).adds += 4 * op.d - 1
                row(c).others += fp / 32
        elif isinstance(op, ReLU):
            row(c).others += op.n * fp / 32
        elif isinstance(op, Residual):
            row(c).adds += op.n
        elif isinstance(op, Cache):
            store(c, op.scalars)
            mul(c, op.n * op.d, a, a)  # h_t . h_i for every stored entry
            row(c).adds += op.n * (op.d - 1)
            if r.cache_extras:
                mul(c, op.n, fp)  # theta x logit
                row(c).others += 2 * op.n * fp / 32  # exp, divide
                row(c).adds += op.n - 1  # normaliser
                mul(c, op.n + 2, fp)  # p(cluster) x p(word | cluster) per cached word; fold lambda, 1 - lambda
                row(c).adds += op.n  # add each entry's mass to its word
            else:
                row(c).others += (3 * op.n - 1) * fp / 32
        elif isinstance(op, ActQuantizers):
            per = 1 + (32 - a) / 32 if r.quantizer_values == "range+inverse" else 2 * fp / 32
            row(c).params += op.n * per
        else:
            raise TypeError(f"unknown op record {op!r}")

    store("stored", *(n for n in tensors if n not in seen))
    if total_nonzeros is not None:
        if not r.allows_total_nonzeros:
            raise ValueError(
                f"a measured total of nonzeros is a paper-convention device; the {settings.convention} "
                "convention needs per-tensor counts (build the description from the model instead)"
            )
        listed = sum(t.nonzeros for t in tensors.values() if t.kind != "norm")
        row("measured_nonzeros").params += (total_nonzeros - listed) * w / 32

    out = tuple(x for x in rows.values())
    tot = {k: sum(getattr(x, k) for x in out) for k in ("params", "muls", "mul_ops", "adds", "others")}
    n_ops = tot["mul_ops"] + tot["adds"] + tot["others"]
    return Score(
        convention=settings.convention, params=tot["params"], ops=n_ops, muls=tot["muls"],
        mul_ops=tot["mul_ops"], adds=tot["adds"], others=tot["others"],
        score=tot["params"] / PARAMS_BASELINE + n_ops / OPS_BASELINE, rows=out, settings=settings,
    )
