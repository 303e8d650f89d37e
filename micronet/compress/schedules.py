"""Per-tensor pruning targets of the original MicroNet entry (spec section 9), in OUR parameter names.

This is the single place the table lives: the scorer (:mod:`micronet.score`) uses it to reproduce the
paper's figures and the pruning stage uses it as its schedule. The 0.477 schedule is the table as
published; the 0.358 and 0.239 schedules scale both initial and final sparsities by 0.75 and 0.5.

Name mapping (ours <- original): ``embed.tables.i.weight`` <- ``embed.layers.i.weight`` (tied with the
softmax output); ``embed.projs.1.weight`` <- ``embed.projections.0.weight`` (64 -> 256);
``layers.L.attn.qkv.weight`` <- ``layers.L.qkv.weight``; ``layers.L.attn.out.weight`` <-
``layers.L.out.weight``; ``layers.L.ffn.0.weight`` <- ``layers.L.fc.0.weight``;
``layers.L.ffn.2.weight`` <- ``layers.L.fc.3.weight``; ``softmax.biases.i`` <- ``loss.layers.i.bias``;
``softmax.projs.1.weight`` <- ``loss.projections.0.weight`` (256 -> 64).
"""

from __future__ import annotations

from fractions import Fraction

# (initial, final) sparsity per pruned tensor, 0.477 schedule. Not listed = never pruned (the 4-dim
# projections, clusters, head bias, other biases, position tables, LayerNorms).
_FINAL_BY_LAYER = {  # layer -> (ffn.0, ffn.2, attn.out, attn.qkv) as (initial, final)
    0: ((0.22, 0.4), (0.15, 0.34), (0.34, 0.59), (0.22, 0.45)),
    1: ((0.28, 0.5), (0.22, 0.5), (0.45, 0.8), (0.34, 0.55)),
    2: ((0.22, 0.55), (0.34, 0.63), (0.4, 0.71), (0.28, 0.45)),
    3: ((0.22, 0.55), (0.34, 0.67), (0.45, 0.77), (0.28, 0.59)),
    4: ((0.28, 0.55), (0.28, 0.59), (0.34, 0.74), (0.28, 0.55)),
    5: ((0.28, 0.55), (0.28, 0.55), (0.4, 0.71), (0.28, 0.55)),
    6: ((0.22, 0.5), (0.22, 0.5), (0.45, 0.8), (0.28, 0.59)),
    7: ((0.15, 0.34), (0.22, 0.4), (0.28, 0.59), (0.22, 0.45)),
}

PRUNE_TARGETS_0477: dict[str, tuple[float, float]] = {
    "embed.tables.0.weight": (0.08, 0.22),
    "embed.tables.1.weight": (0.15, 0.4),
    "embed.tables.2.weight": (0.22, 0.45),
    "embed.projs.1.weight": (0.28, 0.59),
    **{
        f"layers.{layer}.{name}.weight": pair
        for layer, pairs in _FINAL_BY_LAYER.items()
        for name, pair in zip(("ffn.0", "ffn.2", "attn.out", "attn.qkv"), pairs)
    },
    "softmax.biases.1": (0.82, 1.0),
    "softmax.biases.2": (0.22, 1.0),
    "softmax.projs.1.weight": (0.22, 0.45),
}
"""Section-9 table: our parameter name -> (initial, final) sparsity of the 0.477 schedule."""

SCHEDULE_SCALES: dict[str, Fraction] = {"0.477": Fraction(1), "0.358": Fraction(3, 4), "0.239": Fraction(1, 2)}
"""Schedule name (its total sparsity over the 8,296,021 counted parameters) -> factor on the 0.477 table."""

ORIGINAL_NAMES: dict[str, str] = {
    "embed.tables.0.weight": "embed.layers.0.weight",
    "embed.tables.1.weight": "embed.layers.1.weight",
    "embed.tables.2.weight": "embed.layers.2.weight",
    "embed.projs.1.weight": "embed.projections.0.weight",
    **{
        f"layers.{layer}.{ours}.weight": f"layers.{layer}.{orig}.weight"
        for layer in _FINAL_BY_LAYER
        for ours, orig in (("ffn.0", "fc.0"), ("ffn.2", "fc.3"), ("attn.out", "out"), ("attn.qkv", "qkv"))
    },
    "softmax.biases.1": "loss.layers.1.bias",
    "softmax.biases.2": "loss.layers.2.bias",
    "softmax.projs.1.weight": "loss.projections.0.weight",
}
"""Our parameter name -> the original implementation's name (for the pruned tensors)."""


def prune_targets(schedule: str = "0.358") -> dict[str, tuple[float, float]]:
    """(initial, final) sparsity per tensor for ``schedule`` ("0.477", "0.358" or "0.239").

    Values are exact decimal products (0.75 x 0.59 = 0.4425, not 0.44249999...).
    """
    if schedule not in SCHEDULE_SCALES:
        raise ValueError(f"unknown pruning schedule {schedule!r}; expected one of {sorted(SCHEDULE_SCALES)}")
    k = SCHEDULE_SCALES[schedule]
    return {
        name: (float(k * Fraction(str(a))), float(k * Fraction(str(b))))
        for name, (a, b) in PRUNE_TARGETS_0477.items()
    }


def final_densities(schedule: str = "0.358") -> dict[str, float]:
    """Density (1 - final sparsity) per pruned tensor, the input :mod:`micronet.score` takes."""
    k = SCHEDULE_SCALES.get(schedule)
    if k is None:
        raise ValueError(f"unknown pruning schedule {schedule!r}; expected one of {sorted(SCHEDULE_SCALES)}")
    return {name: float(1 - k * Fraction(str(final))) for name, (_, final) in PRUNE_TARGETS_0477.items()}
