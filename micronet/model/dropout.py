"""Dropout whose CPU mask comes from a counter-based hash instead of a Bernoulli generator.

Why: torch's CPU dropout draws every mask element from a sequential-state generator at ~7 ns
per element (bench/attention.py), about a fifth of a training step of the WikiText-2 models,
whose attention dropout alone touches ``B * H * T * (segment_len + n_seq)`` elements per layer.
Here element ``i`` of a call is dropped when the top bits of a 32-bit hash of ``i`` fall below
``p * 2**32`` (the idea behind Philox on GPUs): a handful of vectorised integer passes, ~4x
faster. Each call draws its two hash keys from torch's default generator, so runs stay seeded
and a resumed run (which restores that generator) replays the same masks. Large masks are not
stored: backward recomputes them from the keys, as fused GPU attention kernels do.

On other devices :func:`dropout` is ``F.dropout`` (their generators are already fast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_M1, _M2 = 0x85EBCA6B, 0xC2B2AE35  # murmur3 fmix32 multipliers


def _int32(x: torch.Tensor | int) -> torch.Tensor | int:
    """Wrap int64 values (tensor or int) to the int32 range, two's complement."""
    return (x + (1 << 31)) % (1 << 32) - (1 << 31)


def hash32(shape: torch.Size | tuple[int, ...], mult: int, add: int) -> torch.Tensor:
    """int32 tensor of ``shape``: murmur3's finaliser (without its last xor-shift, which only mixes
    the low bits) applied to ``i * mult + add`` for the flat index ``i`` of every element.

    ``mult`` must be odd. int32 arithmetic wraps like uint32; shifts are made logical by masking.
    """
    n = torch.Size(shape).numel()
    cols = min(n, 4096) or 1  # the flat index as row * cols + col: two small int64 aranges, one broadcast add
    rows = -(-n // cols)
    r = _int32(torch.arange(rows, dtype=torch.int64) * (cols * mult % (1 << 32)) + add).to(torch.int32)
    c = _int32(torch.arange(cols, dtype=torch.int64) * mult).to(torch.int32)
    h = (r[:, None] + c[None, :]).view(-1)[:n].view(shape)  # i * mult + add, wrapped
    t = torch.bitwise_right_shift(h, 16).bitwise_and_(0xFFFF)
    h.bitwise_xor_(t).mul_(_int32(_M1))
    torch.bitwise_right_shift(h, 13, out=t).bitwise_and_(0x7FFFF)
    return h.bitwise_xor_(t).mul_(_int32(_M2))


def keep_scale(shape: torch.Size | tuple[int, ...], p: float, mult: int, add: int) -> torch.Tensor:
    """float32 tensor of ``shape``: ``1 / (1 - p)`` where an element is kept, 0 where it is dropped.

    Element ``i`` is dropped when ``hash32 < -2**31 + D`` with ``D = p * 2**32`` rounded to an even
    count, so the rate is exact to 2**-31. Integer passes only, since bool compares and masked fills
    are the slow CPU kernels here: halving both sides keeps their difference inside int32, and its
    sign, smeared over the word by ``>> 31``, selects the bit pattern of the scale.
    """
    drop_count = 2 * round(p * (1 << 31))
    half_threshold = (-(1 << 31) + drop_count) // 2
    scale_bits = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32).view(torch.int32).item()
    h = hash32(shape, mult, add)
    h.bitwise_right_shift_(1).sub_(half_threshold)  # >= 0 exactly where kept
    h.bitwise_right_shift_(31).bitwise_not_().bitwise_and_(scale_bits)  # kept: scale bits, dropped: 0
    return h.view(torch.float32)


def draw_keys(generator: torch.Generator | None = None) -> tuple[int, int]:
    """Two hash keys (odd multiplier, offset) from torch's generator (the default one when None)."""
    a, b = torch.randint(0, 1 << 62, (2,), generator=generator).tolist()
    return (a % (1 << 32)) | 1, b % (1 << 32)


# Up to this many elements the forward keeps its mask for the backward (4 bytes each, 32 MB at most):
# one multiply instead of re-hashing. Above it, e.g. the 25M-element attention probabilities of the
# 8.3M shapes, the backward recomputes the mask from the keys rather than hold GBs over a step.
KEEP_MASK_MAX_ELEMS = 1 << 23


class _HashDropout(torch.autograd.Function):
    """x * keep_scale(keys); the backward reuses the mask (small tensors) or recomputes it from the keys."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, mult: int, add: int) -> torch.Tensor:
        m = keep_scale(x.shape, p, mult, add)
        ctx.p, ctx.mult, ctx.add = p, mult, add
        ctx.save_for_backward(m if x.numel() <= KEEP_MASK_MAX_ELEMS else None)
        return _scaled(x, m)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (m,) = ctx.saved_tensors
        if m is None:
            m = keep_scale(grad.shape, ctx.p, ctx.mult, ctx.add)
        return _scaled(grad, m), None, None, None


def _scaled(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x * m (m float32) in x's dtype. bf16/fp16: the product is taken in fp32 and rounded once, since
    the scale itself is not exact there (1 / 0.9 would become 1.109375 in bf16, 0.16% low)."""
    if x.dtype in (torch.float32, torch.float64):
        return x * m.to(x.dtype)
    return torch.mul(x, m).to(x.dtype)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout: hash masks on CPU, ``F.dropout`` elsewhere."""
    if not training or p == 0.0:
        return x
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if x.device.type != "cpu" or x.numel() == 0:
        return F.dropout(x, p, True)
    return _HashDropout.apply(x, p, *draw_keys())


class Dropout(nn.Dropout):
    """``nn.Dropout`` with :func:`dropout` (same state dict: none)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
