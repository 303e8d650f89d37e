"""MicroNet score of a TransformerLM: storage and per-token math ops in 32-bit equivalents.

    score = params / 159e6 + ops / 318e6

Usage::

    counts = ModelCounts.from_config(ModelConfig(vocab_size=267735), final_densities("0.358"))
    s = score(counts, bits=9, act_bits=9, n_cache=3000, bin_fractions=WT103_TEST_BIN_FRACTIONS)
    print(render_table(s, group_layers=True))

    s = score_model(model, bits=9, act_bits=9, n_act_quantizers=57, n_cache=3000,
                    bin_fractions=fractions, convention="strict")

A :class:`ModelCounts` says what to count (architecture + per-tensor nonzeros and densities), built
from a config and target densities or measured on a live model. :func:`build_ops` lists the ops one
test token costs; :func:`micronet.scoring.count.count` applies a convention's rule table ("paper" =
the original entry's accounting, "strict" = the official rules applied fully; see
:mod:`micronet.scoring.rules`). The pruning targets of the original live in :mod:`micronet.compress.schedules`.
"""

from __future__ import annotations

import math
import re
from numbers import Integral
from dataclasses import dataclass, replace
from typing import Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from micronet.model.transformer import ModelConfig, TransformerLM
from micronet.scoring.count import count, tensor_storage
from micronet.scoring.rules import (CONVENTIONS, FC, OPS_BASELINE, PARAMS_BASELINE, RULES, ActQuantizers, Cache, Dots,
                                    LayerNorm, Op, ReLU, Residual, Row, Rules, Score, Settings, Softmax, TensorCount,
                                    group_rows)

__all__ = [
    "CONVENTIONS", "FC", "OPS_BASELINE", "PARAMS_BASELINE", "RULES", "ActQuantizers", "Cache", "Dots",
    "LayerNorm", "ModelCounts", "Op", "ReLU", "Residual", "Row", "Rules", "Score", "Settings", "Softmax",
    "TensorCount", "WT103_TEST_BIN_COUNTS", "WT103_TEST_BIN_FRACTIONS", "attention_ops", "bin_fractions",
    "build_ops", "count", "default_act_quantizers", "group_rows", "render_table", "score", "score_config", "score_model", "tensor_storage",
]

WT103_TEST_BIN_COUNTS = (198232, 35479, 11858)
"""WikiText-103 test tokens per adaptive-softmax bin (cutoffs 3500, 25000); 245,569 in all."""
WT103_TEST_BIN_FRACTIONS = tuple(c / sum(WT103_TEST_BIN_COUNTS) for c in WT103_TEST_BIN_COUNTS)

CACHE_SCALARS = "cache.scalars"  # the cache's lambda and theta, stored whenever n_cache > 0
TableScales = Literal["row", "tensor"]


def _layout(cfg: ModelConfig, table_scales: TableScales) -> list[tuple[str, tuple[int, ...], str, int]]:
    """(name, shape, kind, n_scales) of every parameter of ``TransformerLM(cfg)``, tables once."""
    if table_scales not in ("row", "tensor"):
        raise ValueError(f"table_scales must be 'row' or 'tensor', got {table_scales!r}")
    d, edges, dims = cfg.d_model, [0, *cfg.cutoffs, cfg.vocab_size], list(cfg.bin_dims)
    hd = cfg.n_head * cfg.d_head
    out: list[tuple[str, tuple[int, ...], str, int]] = []
    for i, (lo, hi) in enumerate(zip(edges, edges[1:])):
        out.append((f"embed.tables.{i}.weight", (hi - lo, dims[i]), "weight", hi - lo if table_scales == "row" else 1))
    out += [(f"embed.projs.{i}.weight", (d, di), "weight", d) for i, di in enumerate(dims) if di != d]
    for L in range(cfg.n_layer):
        p = f"layers.{L}."
        out += [
            (p + "ln1.weight", (d,), "norm", 0), (p + "ln1.bias", (d,), "norm", 0),
            (p + "attn.pos", (cfg.d_head, cfg.attn_span), "pos", 0),
            (p + "attn.qkv.weight", (3 * hd, d), "weight", 3 * hd), (p + "attn.qkv.bias", (3 * hd,), "bias", 1),
            (p + "attn.out.weight", (d, hd), "weight", d),
            (p + "ln2.weight", (d,), "norm", 0), (p + "ln2.bias", (d,), "norm", 0),
            (p + "ffn.0.weight", (cfg.d_ff, d), "weight", cfg.d_ff), (p + "ffn.0.bias", (cfg.d_ff,), "bias", 1),
            (p + "ffn.2.weight", (d, cfg.d_ff), "weight", d), (p + "ffn.2.bias", (d,), "bias", 1),
        ]
    out += [(f"softmax.biases.{i}", (hi - lo,), "bias", 1) for i, (lo, hi) in enumerate(zip(edges, edges[1:]))]
    n_bins = len(dims)
    if n_bins > 1:
        out += [("softmax.cluster.weight", (n_bins - 1, d), "weight", n_bins - 1),
                ("softmax.cluster.bias", (n_bins - 1,), "bias", 1)]
    out += [(f"softmax.projs.{i}.weight", (di, d), "weight", di) for i, di in enumerate(dims) if di != d]
    return out


def _effective(model: nn.Module, name: str) -> torch.Tensor:
    """The tensor the forward pass uses: masks and parametrizations applied."""
    path, _, attr = name.rpartition(".")
    module = model.get_submodule(path)
    orig, mask = getattr(module, attr + "_orig", None), getattr(module, attr + "_mask", None)
    if isinstance(orig, torch.Tensor) and isinstance(mask, torch.Tensor):  # torch.nn.utils.prune
        return orig * mask
    return getattr(module, attr)  # plain, or torch.nn.utils.parametrize: the parametrized value


@dataclass(frozen=True)
class ModelCounts:
    """What to count: the architecture and one :class:`TensorCount` per parameter (tables once).

    ``total_nonzeros``: optional measured total of stored nonzero values (paper convention only; it
    replaces the per-tensor sum, cache scalars included), set with :meth:`with_measured_nonzeros`.
    """

    cfg: ModelConfig
    tensors: Mapping[str, TensorCount]
    total_nonzeros: int | None = None

    @classmethod
    def from_config(
        cls, cfg: ModelConfig, densities: Mapping[str, float] | None = None, *, table_scales: TableScales = "row"
    ) -> "ModelCounts":
        """Describe ``TransformerLM(cfg)`` with per-tensor ``densities`` (1 - sparsity; default 1).

        Ops use each density exactly; storage uses ``nonzeros = round_half_up(numel * density)``
        (``numel * density`` first rounded to 6 decimals so float noise cannot flip a tie).
        ``table_scales``: quantization scales of the tied tables, one per row (the original, whose
        softmax quantized them per output channel) or one per table.
        """
        cfg.validate()
        layout = _layout(cfg, table_scales)
        densities = dict(densities or {})
        unknown = sorted(set(densities) - {n for n, *_ in layout})
        if unknown:
            raise ValueError(f"densities for unknown parameters {unknown}; names are TransformerLM's, e.g. "
                             "'layers.0.attn.qkv.weight'")
        tensors = {}
        for name, shape, kind, n_scales in layout:
            dens = float(densities.get(name, 1.0))
            if not 0.0 <= dens <= 1.0:
                raise ValueError(f"density of {name} must be in [0, 1], got {dens}")
            numel = math.prod(shape)
            nz = math.floor(round(numel * dens, 6) + 0.5)
            tensors[name] = TensorCount(name, shape, nz, dens, kind, n_scales)
        return cls(cfg, tensors)

    @classmethod
    def from_model(cls, model: TransformerLM, *, table_scales: TableScales = "row") -> "ModelCounts":
        """Measure a live model: density = nonzero fraction of each effective weight.

        Pruning masks are honoured whether kept by ``torch.nn.utils.prune`` (``weight_orig`` x
        ``weight_mask``) or by ``torch.nn.utils.parametrize`` (``module.weight`` is the masked value).
        """
        cfg = model.cfg
        layout = _layout(cfg, table_scales)
        known = {name for name, *_ in layout}
        for pname, _ in model.named_parameters():
            canonical = re.sub(r"_orig$", "", re.sub(r"\.parametrizations\.([^.]+)\.original\d*$", r".\1", pname))
            if canonical not in known and not pname.startswith("cache."):  # cache.*: counted via n_cache
                raise ValueError(f"the scorer does not know how to count parameter {pname!r}")
        tensors = {}
        with torch.no_grad():
            for name, shape, kind, n_scales in layout:
                t = _effective(model, name)
                if tuple(t.shape) != shape:
                    raise ValueError(f"{name} has shape {tuple(t.shape)}, the config implies {shape}")
                nz = int(torch.count_nonzero(t))
                tensors[name] = TensorCount(name, shape, nz, nz / t.numel(), kind, n_scales)
        return cls(cfg, tensors)

    @property
    def counted_numel(self) -> int:
        """Values the paper convention counts: every parameter except LayerNorms (8,296,021 for 8.3M)."""
        return sum(t.numel for t in self.tensors.values() if t.kind != "norm")

    @property
    def numel(self) -> int:
        """All parameters, tied tables once (8,304,213 for the original 8.3M)."""
        return sum(t.numel for t in self.tensors.values())

    @property
    def nonzeros(self) -> int:
        """Nonzero values the paper convention stores (LayerNorms excluded, cache scalars not included)."""
        return sum(t.nonzeros for t in self.tensors.values() if t.kind != "norm")

    def with_measured_nonzeros(self, nonzeros: int, of_total: int) -> "ModelCounts":
        """Use a measured count of stored nonzeros for storage (paper convention only).

        ``of_total`` is the number of values it was counted over, a check: :attr:`counted_numel`, or
        that plus the 2 cache scalars when the measurement included them (the paper's "5,326,376 of
        8,296,021" and submission 3's "5,487,556 of 8,296,023"). Ops keep using the densities.
        """
        allowed = (self.counted_numel, self.counted_numel + 2)
        if of_total not in allowed:
            raise ValueError(f"measured nonzeros are over {of_total} values, but this model has {allowed[0]} "
                             f"counted values ({allowed[1]} with the cache scalars)")
        if not 0 <= nonzeros <= of_total:
            raise ValueError(f"nonzeros must be in [0, {of_total}], got {nonzeros}")
        return replace(self, total_nonzeros=int(nonzeros))


def attention_ops(prefix: str, n_head: int, d_head: int, span: int, pos: str | None) -> list[Op]:
    """Per-token attention core over a window of ``span`` keys: q.k, q.E, softmax, attn.V.

    The 1/sqrt(d_head) scale is folded into the query projection and costs nothing.
    """
    return [
        Dots(prefix + "q.k", count=n_head * span, length=d_head),
        Dots(prefix + "q.E", count=span, length=d_head, y="fp", extra_adds=1, heads=n_head, tensor=pos),
        Softmax(prefix + "attn_softmax", n=span, heads=n_head),
        Dots(prefix + "attn.V", count=n_head * d_head, length=span),
    ]


def default_act_quantizers(cfg: ModelConfig, act_bits: int) -> int:
    """7 per layer (LN1 out, qkv out, attention probabilities, attn.V, LN2 out, ReLU out, FFN out) + the
    final hidden state when activations are quantized (57 for 8 layers), else 0."""
    return 7 * cfg.n_layer + 1 if act_bits < 32 else 0


def build_ops(counts: ModelCounts, settings: Settings) -> list[Op]:
    """The ops one test token costs (batch 1, online), in network order, grouped by component.

    The input side runs one bin per token (input projections weighted by ``bin_fractions``); the
    output side computes every softmax bin for every token. The sqrt(d_model) input scale is folded
    into the embedding's dequantization scale. The tied tables' storage is reported in the softmax
    rows (``softmax.head`` holds table 0, ``softmax.tail.i`` table i): the input lookup is free.
    """
    cfg = counts.cfg
    d, dims, edges = cfg.d_model, list(cfg.bin_dims), [0, *cfg.cutoffs, cfg.vocab_size]
    sizes = [hi - lo for lo, hi in zip(edges, edges[1:])]
    fr = settings.bin_fractions
    if fr is None:
        raise ValueError("bin_fractions is required: the fraction of test tokens per adaptive-softmax bin "
                         "(see bin_fractions() and WT103_TEST_BIN_FRACTIONS)")
    if len(fr) != len(dims):
        raise ValueError(f"bin_fractions needs one fraction per bin ({len(dims)}), got {len(fr)}")
    ops: list[Op] = [
        FC(f"embed.in_proj.{i}", f"embed.projs.{i}.weight", di, d, x="weight", rate=fr[i])
        for i, di in enumerate(dims) if di != d
    ]
    hd = cfg.n_head * cfg.d_head
    for L in range(cfg.n_layer):
        p = f"layers.{L}."
        ops += [
            LayerNorm(p + "ln1", d, p + "ln1.weight", p + "ln1.bias"),
            FC(p + "qkv", p + "attn.qkv.weight", d, 3 * hd, bias=p + "attn.qkv.bias"),
            *attention_ops(p, cfg.n_head, cfg.d_head, cfg.attn_span, p + "attn.pos"),
            FC(p + "out", p + "attn.out.weight", hd, d),
            Residual(p + "residual", d),
            LayerNorm(p + "ln2", d, p + "ln2.weight", p + "ln2.bias"),
            FC(p + "fc1", p + "ffn.0.weight", d, cfg.d_ff, bias=p + "ffn.0.bias"),
            ReLU(p + "relu", cfg.d_ff),
            FC(p + "fc2", p + "ffn.2.weight", cfg.d_ff, d, bias=p + "ffn.2.bias"),
            Residual(p + "residual", d),
        ]
    for i, (di, size) in enumerate(zip(dims, sizes)):
        c = "softmax.head" if i == 0 else f"softmax.tail.{i}"
        if di != d:  # bias-free projection; its output is not quantized, so the logits see fp32
            ops.append(FC(c, f"softmax.projs.{i}.weight", d, di))
        ops.append(FC(c, f"embed.tables.{i}.weight", di, size, bias=f"softmax.biases.{i}",
                      x="fp" if di != d else "act"))
        if i == 0 and len(dims) > 1:
            ops.append(FC(c, "softmax.cluster.weight", d, len(dims) - 1, bias="softmax.cluster.bias"))
        ops.append(Softmax(c, size + (len(dims) - 1 if i == 0 else 0)))
    if settings.n_cache:
        ops.append(Cache("cache", settings.n_cache, d, scalars=CACHE_SCALARS))
    n_act_quantizers = settings.n_act_quantizers
    if n_act_quantizers is None:
        n_act_quantizers = default_act_quantizers(cfg, settings.act_bits)
    if n_act_quantizers:
        ops.append(ActQuantizers("act_quantizers", n_act_quantizers))
    return ops


def score(
    counts: ModelCounts,
    *,
    bits: int = 32,
    act_bits: int | None = None,
    n_act_quantizers: int | None = None,
    n_cache: int = 0,
    bin_fractions: Sequence[float] | None = None,
    convention: str = "paper",
    free_16bit: bool = False,
) -> Score:
    """Score a :class:`ModelCounts` (``act_bits`` defaults to ``bits``). Raises ValueError on bad input."""
    act_bits = bits if act_bits is None else act_bits
    if n_act_quantizers is None and isinstance(act_bits, Integral):
        n_act_quantizers = default_act_quantizers(counts.cfg, act_bits)
    settings = Settings(
        bits=bits, act_bits=act_bits, n_act_quantizers=n_act_quantizers, n_cache=n_cache,
        bin_fractions=None if bin_fractions is None else tuple(bin_fractions),
        convention=convention, free_16bit=free_16bit,
    )
    tensors = dict(counts.tensors)
    if n_cache:
        tensors[CACHE_SCALARS] = TensorCount(CACHE_SCALARS, (2,), 2, 1.0, "scalar")
    return count(build_ops(counts, settings), tensors, settings, counts.total_nonzeros)


def score_config(cfg: ModelConfig, densities: Mapping[str, float] | None = None, *,
                 table_scales: TableScales = "row", **settings) -> Score:
    """:func:`score` of ``ModelCounts.from_config(cfg, densities)``; ``settings`` are :func:`score`'s."""
    return score(ModelCounts.from_config(cfg, densities, table_scales=table_scales), **settings)


def score_model(model: TransformerLM, *, table_scales: TableScales = "row", **settings) -> Score:
    """:func:`score` of a live model, densities measured from its (masked) weights; ``settings``
    (bits, act_bits, n_act_quantizers, n_cache, bin_fractions, convention, free_16bit) are :func:`score`'s."""
    return score(ModelCounts.from_model(model, table_scales=table_scales), **settings)


def bin_fractions(tokens, cutoffs: Sequence[int], vocab_size: int | None = None) -> tuple[float, ...]:
    """Fraction of ``tokens`` (ids sorted by frequency) in each bin ``[0, c1), [c1, c2), ...``."""
    arr = np.asarray(tokens).reshape(-1)
    if arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError("tokens must be a non-empty array of integer ids")
    if arr.min() < 0 or (vocab_size is not None and arr.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{arr.min()}, {arr.max()}]")
    cut = np.asarray(list(cutoffs), dtype=np.int64)
    if np.any(np.diff(cut) <= 0) or (cut.size and cut[0] <= 0):
        raise ValueError(f"cutoffs must be positive and strictly increasing, got {list(cutoffs)}")
    counts = np.bincount(np.searchsorted(cut, arr, side="right"), minlength=cut.size + 1)
    return tuple(float(c) / arr.size for c in counts)


def render_table(s: Score, *, group_layers: bool = False) -> str:
    """The per-component breakdown as a fixed-width text table, totals last."""
    rows = group_rows(s.rows) if group_layers else list(s.rows)
    st = s.settings
    head = (f"MicroNet score ({s.convention}): bits {st.bits}, act_bits {st.act_bits}, cache {st.n_cache}"
            f"{', 16-bit freebie' if st.free_16bit else ''}")
    fmt = "{:<26} {:>14} {:>14} {:>14} {:>14} {:>12} {:>14}"
    lines = [head, fmt.format("component", "params", "muls", "mul ops", "adds", "others", "ops")]
    lines.append("-" * len(lines[-1]))
    for r in [*rows, Row("total", s.params, s.muls, s.mul_ops, s.adds, s.others)]:
        if r.component == "total":
            lines.append("-" * len(lines[1]))
        lines.append(fmt.format(r.component, *(f"{v:,.2f}" for v in (r.params, r.muls, r.mul_ops, r.adds, r.others, r.ops))))
    lines.append(f"score = {s.params:,.2f} / 159e6 + {s.ops:,.2f} / 318e6 = {s.score:.6f}")
    return "\n".join(lines)
