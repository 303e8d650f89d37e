"""log p(target) under a linear softmax, without materialising the (rows x words) log-probabilities.

``target_log_prob(x, W, b, t)[n] = log softmax(x[n] @ W.T + b)[t[n]]``, computed block by block:
a block of rows times all words stays in the CPU's last-level cache, so the logits are exponentiated
and summed while hot, with one exp pass and no log-softmax output or its backward. The backward either
turns the probabilities kept by the forward into the logit gradient in place and runs its matmuls over
all rows at once (the default: fastest measured, for every bin width), or, with ``keep_probs=False``,
recomputes each block's logits (one extra matmul, and no (rows x words) buffer: the 8.3M model's
rare-word bin is 242,735 words wide, about 0.8 GB of fp32 per training batch).

Measured on the 8.3M training batch (14 x 1152 tokens, one thread), side by side in one process:
see ``bench/softmax.py``.
"""

from __future__ import annotations

import torch

# Target size of one block of logits (elements): ~8 MB of fp32, well inside a 32 MB L3.
BLOCK_ELEMS = 1 << 21
# Inner dimension from which keeping the probabilities beats recomputing them (measured: bench/softmax.py).
KEEP_PROBS_MIN_DIM = 1
# Inner dimension below which the backward runs its two matmuls transposed (measured: see the backward).
NARROW_DIM = 16


def _rows_per_block(n_words: int, block_elems: int) -> int:
    return max(1, block_elems // max(1, n_words))


class _LinearTargetLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                block_elems: int, keep_probs: bool) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)  # at least fp32: the normaliser needs it
        with torch.autocast(x.device.type, enabled=False):
            xw, w = x.to(dtype), weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            N, V = x.shape[0], w.shape[0]
            R = _rows_per_block(V, block_elems)
            lse = torch.empty(N, dtype=dtype, device=x.device)
            picked = torch.empty_like(lse)
            probs = torch.empty(N, V, dtype=dtype, device=x.device) if keep_probs else None
            for a in range(0, N, R):
                out = probs[a : a + R] if keep_probs else None
                logits = _logits(xw[a : a + R], w, b, out)  # (R, V)
                picked[a : a + R] = logits.gather(1, target[a : a + R, None]).squeeze(1)
                m = logits.amax(1, keepdim=True)  # (R, 1)
                e = logits.sub_(m).exp_()  # (R, V) unnormalised probabilities, in place
                s = e.sum(1, keepdim=True)  # (R, 1)
                lse[a : a + R] = (m + s.log()).squeeze(1)
                if keep_probs:
                    e.div_(s)
        ctx.save_for_backward(x, weight, bias, target, lse, probs)
        ctx.block_elems = block_elems
        return picked - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, bias, target, lse, probs = ctx.saved_tensors
        dtype = lse.dtype
        with torch.autocast(x.device.type, enabled=False):
            xw, w = x.to(dtype), weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            g = grad.to(dtype)
            gx = torch.empty_like(xw) if ctx.needs_input_grad[0] else None
            gw = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
            gb = torch.zeros_like(b) if b is not None and ctx.needs_input_grad[2] else None
            # Narrow bins (the rare-word tails, d of 4-8): MKL runs (R, V) @ (V, d) and (V, R) @ (R, d) 2.7x and
            # 5x faster as their transposes, (d, V) @ (V, R) and (d, R) @ (R, V) (measured at 90 x 23,278, d 8).
            narrow = w.shape[1] < NARROW_DIM
            # Kept probabilities: all rows at once, since the matmuls of one block are thin (R = 8 rows in the
            # 8.3M model's 242,735-word bin) and its per-block weight-gradient adds cost more than the matmuls.
            R = x.shape[0] if probs is not None else _rows_per_block(w.shape[0], ctx.block_elems)
            for a in range(0, x.shape[0], R):
                xa, ga = xw[a : a + R], g[a : a + R, None]  # (R, d), (R, 1)
                if probs is not None:
                    # The kept probabilities become the logit gradient in place, with no second (R, V) buffer;
                    # autograd's version counter refuses a second backward through them (retain_graph).
                    dl = probs[a : a + R].mul_(-ga)  # (R, V)
                else:  # recompute this block's softmax
                    dl = _logits(xa, w, b).sub_(lse[a : a + R, None]).exp_().mul_(-ga)  # (R, V)
                # d log p_t / d logits = onehot(t) - softmax, scaled by the incoming gradient.
                dl.scatter_add_(1, target[a : a + R, None], ga)
                if gx is not None:
                    if narrow:
                        gx[a : a + R] = torch.mm(w.T, dl.T).T  # (d, V) @ (V, R) -> (R, d)
                    else:
                        torch.mm(dl, w, out=gx[a : a + R])
                if gw is not None:
                    if narrow:
                        gw += torch.mm(xa.T, dl).T  # (d, R) @ (R, V) -> (V, d)
                    else:
                        gw.addmm_(dl.T, xa)
                if gb is not None:
                    gb += dl.sum(0)
        return (gx.to(x.dtype) if gx is not None else None, gw.to(weight.dtype) if gw is not None else None,
                gb.to(bias.dtype) if gb is not None else None, None, None, None)


def _logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (R, d) @ w.T (+ b) -> (R, V), into ``out`` when given."""
    if b is None:
        return torch.mm(x, w.T, out=out) if out is not None else x @ w.T
    return torch.addmm(b, x, w.T, out=out) if out is not None else torch.addmm(b, x, w.T)


def target_log_prob(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                    block_elems: int | None = None, keep_probs: bool | None = None) -> torch.Tensor:
    """``log_softmax(x @ weight.T + bias)[n, target[n]]`` for every row: x (N, d), weight (V, d), bias (V,)
    or None, target (N,) int64 in [0, V) -> (N,) in at least fp32, with gradients for x, weight and bias.

    ``keep_probs``: store the (N, V) probabilities for the backward (when gradients are needed) instead of
    recomputing them; default: store when ``d >= KEEP_PROBS_MIN_DIM``, which is 1 (storing was faster for
    every bin of the 8.3M model; raising it trades that speed for the memory of the narrow, wide tails).
    """
    block_elems = block_elems or BLOCK_ELEMS
    if keep_probs is None:
        keep_probs = x.shape[1] >= KEEP_PROBS_MIN_DIM
    keep_probs = keep_probs and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if x.shape[0] == 0:
        return x.new_zeros(0, dtype=torch.promote_types(x.dtype, torch.float32))
    return _LinearTargetLogProb.apply(x, weight, bias, target, block_elems, keep_probs)
