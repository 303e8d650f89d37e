"""log p(target) under a linear softmax, without materialising the (rows x words) log-probabilities.

``target_log_prob(x, W, b, t)[n] = log softmax(x[n] @ W.T + b)[t[n]]``, or for k targets per row
(t of shape (N, k), as distillation's top-k soft labels need) ``[n, j] = ...[t[n, j]]``, computed block by block:
a block of rows times all words stays in the CPU's last-level cache, so the logits are exponentiated
and summed while hot, with one exp pass and no log-softmax output or its backward. The backward either
turns the probabilities kept by the forward into the logit gradient in place and runs its matmuls over
all rows at once (the default: fastest measured, for every bin width), or, with ``keep_probs=False``,
recomputes each block's logits (one extra matmul, and no (rows x words) buffer: the 8.3M model's
rare-word bin is 242,735 words wide, about 0.8 GB of fp32 per training batch).

Narrow bins over many words (the 8.3M model's 242,735-word d=4 tail) take a third path instead, by
column blocks, in fp32 and keeping nothing (:func:`narrow_target_log_prob`).

Measured on the 8.3M training batch (14 x 1152 tokens, one thread), side by side in one process:
see ``bench/softmax.py``.
"""

from __future__ import annotations

import torch

# Target size of one block of logits (elements): ~8 MB of fp32, well inside a 32 MB L3.
BLOCK_ELEMS = 1 << 21
# Inner dimension from which keeping the probabilities beats recomputing them (measured: bench/softmax.py).
KEEP_PROBS_MIN_DIM = 1
# Narrow bins (d < NARROW_DIM) of more logits (rows x words) than this take the column-blocked path
# (:class:`_NarrowTargetLogProb`): fp32, nothing kept, every pass over a cache-resident block. The 8.3M
# model's 242,735-word, d=4 bin has ~774 x 242,735 = 188M logits per 14 x 1152 batch (0.75 GB fp32 kept).
NARROW_BLOCKED_MIN_ELEMS = 1 << 22
# Logits per column block of that path: ~2 MB of fp32 (L2/L3-resident while all its passes run).
NARROW_BLOCK_ELEMS = 1 << 19
# Inner dimension below which the backward runs its two matmuls transposed (measured: see the backward).
NARROW_DIM = 16


def _rows_per_block(n_words: int, block_elems: int) -> int:
    return max(1, block_elems // max(1, n_words))


def _cols(t: torch.Tensor) -> torch.Tensor:
    """Targets or their gradients as (N, k) columns: (N,) -> (N, 1), (N, k) unchanged."""
    return t[:, None] if t.dim() == 1 else t


def _target_grads(t: torch.Tensor, g: torch.Tensor, gs: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """The logit gradient at the target columns, fp32: (R, k) ``sum_{j: t_j = t_i} g_j - p_{t_i} sum_j g_j``.

    A column named twice in a row (a repeated id) gets the sum of both gradients, so every copy
    carries the same value and ``scatter_`` is exact. For k = 1 this is ``g (1 - p_t)`` without
    cancellation (``-expm1(lp)``).
    """
    if t.shape[1] == 1:
        return g * -torch.expm1(lp)
    same = (t[:, :, None] == t[:, None, :]).to(g.dtype)  # (R, k, k)
    return torch.bmm(same, g[:, :, None]).squeeze(2) - lp.exp() * gs


class _LinearTargetLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                block_elems: int, keep_probs: bool, mm_dtype: torch.dtype) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)  # at least fp32: the normaliser needs it
        with torch.autocast(x.device.type, enabled=False):
            xw, w = x.to(mm_dtype), weight.to(mm_dtype)
            b = bias.to(mm_dtype) if bias is not None else None
            N, V = x.shape[0], w.shape[0]
            R = _rows_per_block(V, block_elems)
            lse = torch.empty(N, dtype=dtype, device=x.device)
            picked = torch.empty(target.shape, dtype=dtype, device=x.device)  # (N,) or (N, k)
            # bf16: logits, exponentials and kept probabilities in bf16 (half the memory and traffic), the
            # sums, log-normaliser and output in fp32.
            probs = torch.empty(N, V, dtype=mm_dtype, device=x.device) if keep_probs else None
            for a in range(0, N, R):
                out = probs[a : a + R] if keep_probs else None
                logits = _logits(xw[a : a + R], w, b, out)  # (R, V)
                picked[a : a + R] = logits.gather(1, _cols(target[a : a + R])).view_as(picked[a : a + R])
                m = logits.amax(1, keepdim=True)  # (R, 1)
                e = logits.sub_(m).exp_()  # (R, V) unnormalised probabilities, in place
                s = e.sum(1, keepdim=True, dtype=dtype)  # (R, 1)
                lse[a : a + R] = (m.to(dtype) + s.log()).squeeze(1)
                if keep_probs:
                    e.div_(s)
        out = picked - (lse if target.dim() == 1 else lse[:, None])
        ctx.save_for_backward(x, weight, bias, target, lse, probs, out)
        ctx.block_elems, ctx.mm_dtype = block_elems, mm_dtype
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, bias, target, lse, probs, out = ctx.saved_tensors
        dtype, mm_dtype = lse.dtype, ctx.mm_dtype
        low = mm_dtype != dtype  # bf16 matmuls and logit gradient
        with torch.autocast(x.device.type, enabled=False):
            xw, w = x.to(mm_dtype), weight.to(mm_dtype)
            b = bias.to(mm_dtype) if bias is not None else None
            g = _cols(grad.to(dtype))  # (N, k): k = 1 for one target per row
            lp = _cols(out)  # (N, k)
            gx = torch.empty_like(xw) if ctx.needs_input_grad[0] else None
            gw = torch.zeros(w.shape, dtype=dtype, device=w.device) if ctx.needs_input_grad[1] else None
            gb = torch.zeros(b.shape, dtype=dtype, device=b.device) if b is not None and ctx.needs_input_grad[2] else None
            # Narrow bins (the rare-word tails, d of 4-8): MKL runs (R, V) @ (V, d) and (V, R) @ (R, d) 2.7x and
            # 5x faster as their transposes, (d, V) @ (V, R) and (d, R) @ (R, V) (measured at 90 x 23,278, d 8).
            narrow = w.shape[1] < NARROW_DIM
            # Kept probabilities: all rows at once, since the matmuls of one block are thin (R = 8 rows in the
            # 8.3M model's 242,735-word bin) and its per-block weight-gradient adds cost more than the matmuls.
            R = x.shape[0] if probs is not None else _rows_per_block(w.shape[0], ctx.block_elems)
            for a in range(0, x.shape[0], R):
                xa, ga = xw[a : a + R], g[a : a + R]  # (R, d), (R, k)
                gs = ga.sum(1, keepdim=True)  # (R, 1)
                if probs is not None:
                    # The kept probabilities become the logit gradient in place, with no second (R, V) buffer;
                    # autograd's version counter refuses a second backward through them (retain_graph).
                    dl = probs[a : a + R].mul_(-gs.to(mm_dtype))  # (R, V)
                else:  # recompute this block's softmax
                    dl = _logits(xa, w, b).sub_(lse[a : a + R, None].to(mm_dtype)).exp_().mul_(-gs.to(mm_dtype))
                # d sum_j g_j log p_{t_j} / d logits = sum_j g_j onehot(t_j) - softmax * sum_j g_j.
                ta = _cols(target[a : a + R])  # (R, k)
                if low:  # target columns from the fp32 log-probs with one rounding, not bf16's g - p_t g
                    dl.scatter_(1, ta, _target_grads(ta, ga, gs, lp[a : a + R]).to(mm_dtype))
                else:
                    dl.scatter_add_(1, ta, ga)
                if gx is not None:
                    if narrow:
                        gx[a : a + R] = torch.mm(w.T, dl.T).T  # (d, V) @ (V, R) -> (R, d)
                    else:
                        torch.mm(dl, w, out=gx[a : a + R])
                if gw is not None:
                    if narrow:
                        gw += torch.mm(xa.T, dl).T  # (d, R) @ (R, V) -> (V, d)
                    elif low:
                        gw += torch.mm(dl.T, xa)
                    else:
                        gw.addmm_(dl.T, xa)
                if gb is not None:
                    gb += dl.sum(0)  # bf16 sums accumulate in fp32 (no fp32 copy of dl)
        return (gx.to(x.dtype) if gx is not None else None, gw.to(weight.dtype) if gw is not None else None,
                gb.to(bias.dtype) if gb is not None else None, None, None, None, None)


class _NarrowTargetLogProb(torch.autograd.Function):
    """The same function for a narrow bin (d of 4-8) over many words, by blocks of columns (words).

    A d=4 bin's matmuls are trivial and its cost is the passes over (rows x words) logits, so this path
    makes every pass hit a block in cache: the forward runs an online softmax (running max and rescaled
    sum, as flash attention does) over column blocks of all rows, the backward recomputes each block's
    probabilities from the fp32 log-normaliser. The one-hot part of the gradient, g * (e_t - p), is added
    once by index; blocks only carry -g * p. fp32 (fp64 for fp64 inputs) whatever the autocast: bf16 buys
    nothing at d=4 and its elementwise passes were slower here (1.36 s vs 0.88 s for the 8.3M batch).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                cols: int) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            xf, w = x.to(dtype), weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            N, V = xf.shape[0], w.shape[0]
            m = torch.full((N, 1), float("-inf"), dtype=dtype, device=x.device)  # running row max
            s = torch.zeros(N, 1, dtype=dtype, device=x.device)  # running sum of exp(logit - m)
            for c in range(0, V, cols):
                z = _logits(xf, w[c : c + cols], b[c : c + cols] if b is not None else None)  # (N, cols)
                m_new = torch.maximum(m, z.amax(1, keepdim=True))
                s = s * (m - m_new).exp_() + z.sub_(m_new).exp_().sum(1, keepdim=True)
                m = m_new
            lse = (m + s.log()).squeeze(1)  # (N,)
            t = _cols(target)  # (N, k)
            picked = (xf[:, None, :] * w[t]).sum(2) + (b[t] if b is not None else 0)  # (N, k) target logits
        ctx.save_for_backward(x, weight, bias, target, lse)
        ctx.cols = cols
        return (picked - lse[:, None]).view(target.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, bias, target, lse = ctx.saved_tensors
        dtype, cols = lse.dtype, ctx.cols
        with torch.autocast(x.device.type, enabled=False):
            xf, w = x.to(dtype), weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            gk, t = _cols(grad.to(dtype)), _cols(target)  # (N, k) each
            g = gk.sum(1, keepdim=True)  # (N, 1)
            # the one-hot part: d log p_t / d logit_t += g_t
            gx = (gk[:, :, None] * w[t]).sum(1)  # (N, d)
            gw = torch.zeros_like(w).index_add_(0, t.reshape(-1), (gk[:, :, None] * xf[:, None, :]).flatten(0, 1))
            gb = torch.zeros_like(b).index_add_(0, t.reshape(-1), gk.reshape(-1)) if b is not None else None
            for c in range(0, w.shape[0], cols):
                wc = w[c : c + cols]
                p = _logits(xf, wc, b[c : c + cols] if b is not None else None).sub_(lse[:, None]).exp_().mul_(g)
                gx -= torch.mm(wc.T, p.T).T  # (d, cols) @ (cols, N): the transposed (narrow) products
                gw[c : c + cols] -= torch.mm(xf.T, p).T  # (d, N) @ (N, cols) -> (cols, d)
                if gb is not None:
                    gb[c : c + cols] -= p.sum(0)
        return (gx.to(x.dtype) if ctx.needs_input_grad[0] else None,
                gw.to(weight.dtype) if ctx.needs_input_grad[1] else None,
                gb.to(bias.dtype) if gb is not None and ctx.needs_input_grad[2] else None, None, None)


def narrow_target_log_prob(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                           block_elems: int | None = None) -> torch.Tensor:
    """:func:`target_log_prob` by column blocks of ``block_elems`` logits (default ``NARROW_BLOCK_ELEMS``),
    in fp32: the path of narrow, wide bins (see :class:`_NarrowTargetLogProb`)."""
    cols = max(1, (block_elems or NARROW_BLOCK_ELEMS) // max(1, x.shape[0]))
    return _NarrowTargetLogProb.apply(x, weight, bias, target, cols)


def _logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (R, d) @ w.T (+ b) -> (R, V), into ``out`` when given."""
    if b is None:
        return torch.mm(x, w.T, out=out) if out is not None else x @ w.T
    return torch.addmm(b, x, w.T, out=out) if out is not None else torch.addmm(b, x, w.T)


def target_log_prob(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                    block_elems: int | None = None, keep_probs: bool | None = None) -> torch.Tensor:
    """``log_softmax(x @ weight.T + bias)[n, target[n]]`` for every row: x (N, d), weight (V, d), bias (V,)
    or None, target (N,) int64 in [0, V) -> (N,) in at least fp32, with gradients for x, weight and bias;
    target (N, k) -> (N, k), the log-probabilities of k words per row (one softmax, k gathers).
    Under bf16 autocast (or for bf16 ``x``) the matmuls, logits and kept probabilities are bf16; the
    exponential sums, the log-normaliser, the output and the weight/bias gradients' sums stay fp32.

    ``keep_probs``: store the (N, V) probabilities for the backward (when gradients are needed) instead of
    recomputing them; default: store when ``d >= KEEP_PROBS_MIN_DIM``, which is 1 (storing was faster for
    every bin of the 8.3M model). A narrow bin (``d < NARROW_DIM``) of more than ``NARROW_BLOCKED_MIN_ELEMS``
    logits, such as the 8.3M model's rare-word tail, takes :func:`narrow_target_log_prob` unless
    ``keep_probs`` or ``block_elems`` is given.
    """
    if x.shape[1] < NARROW_DIM and x.shape[0] * weight.shape[0] > NARROW_BLOCKED_MIN_ELEMS and x.shape[0] \
            and keep_probs is None and block_elems is None:
        return narrow_target_log_prob(x, weight, bias, target)
    block_elems = block_elems or BLOCK_ELEMS
    mm_dtype = torch.promote_types(x.dtype, torch.float32)
    if x.dtype == torch.bfloat16 or (torch.is_autocast_enabled(x.device.type)
                                     and torch.get_autocast_dtype(x.device.type) == torch.bfloat16):
        mm_dtype = torch.bfloat16  # bf16 autocast: bf16 matmuls, fp32 normaliser (see the forward)
    if keep_probs is None:
        keep_probs = x.shape[1] >= KEEP_PROBS_MIN_DIM
    keep_probs = keep_probs and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if x.shape[0] == 0:
        return x.new_zeros(target.shape, dtype=torch.promote_types(x.dtype, torch.float32))
    return _LinearTargetLogProb.apply(x, weight, bias, target, block_elems, keep_probs, mm_dtype)
