"""Band attention kernels: every segment of L queries against its n_seq + L keys, with a relative
position logit per distance, as autograd Functions whose backward passes are cheaper than autograd's.

Shapes: B batch, S segments, L queries per segment, H heads, dh head width, C = n_seq + 1 distances,
W = n_seq + L keys per segment. The skew (Transformer-XL's relative shift without the shift's extra
column) puts ``x[..., i, c]`` at ``out[..., i, i + c]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _Windows(torch.autograd.Function):
    """Keys and values of every segment's window, copied out of the overlapping positions.

    Backward adds each window's gradient back block by block (W / L strided adds), several times
    faster than autograd's ``unfold`` backward (bench/attention.py).
    """

    @staticmethod
    def forward(ctx, kv: torch.Tensor, n_seq: int, L: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, P, _, H, dh = kv.shape  # P = n_seq + S * L positions
        S, W = (P - n_seq) // L, n_seq + L
        ctx.shape, ctx.n_seq, ctx.L = kv.shape, n_seq, L
        win = kv.unfold(1, W, L)  # (B, S, 2, H, dh, W), a view
        kvw = win.permute(2, 0, 1, 3, 5, 4).reshape(2, B * S, H, W, dh)  # (2, B*S, H, W, dh), one copy
        return kvw[0], kvw[1]

    @staticmethod
    def backward(ctx, gk: torch.Tensor, gv: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        B, P, _, H, dh = ctx.shape
        n_seq, L = ctx.n_seq, ctx.L
        S, W = (P - n_seq) // L, n_seq + L
        out = gk.new_zeros(B, P + L, 2, H, dh)  # L spare positions: the last block's view may reach past P
        # One copy to the positions' layout, (B, S, W, 2, H, dh), so that each block's add below reads and
        # writes (2, H, dh) runs contiguously (adding the transposed windows directly was ~10x slower).
        g = gk.new_empty(B, S, W, 2, H, dh)
        for i, gi in enumerate((gk, gv)):
            g[:, :, :, i].copy_(gi.view(B, S, H, W, dh).transpose(2, 3))
        for start in range(0, W, L):  # window columns [start, start + w) of all segments at once
            w = min(L, W - start)
            dst = out[:, start : start + S * L].view(B, S, L, 2, H, dh)[:, :, :w]  # (B, S, w, 2, H, dh)
            dst += g[:, :, start : start + w]
        return out[:, :P], None, None


def windows(kv: torch.Tensor, n_seq: int, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kv (B, n_seq + S*L, 2, H, dh) -> keys, values (B*S, H, n_seq + L, dh): segment s sees positions
    [s*L, s*L + n_seq + L) of kv, its own L plus the n_seq before."""
    return _Windows.apply(kv, n_seq, L)


def _skew(x: torch.Tensor, fill: float) -> torch.Tensor:
    """Pad each row by L ``fill`` values, flatten, drop the last L, view as L rows of L + C - 1: row i
    moves right by i and every entry off the band is a pad value."""
    *lead, L, C = x.shape
    flat = F.pad(x, (0, L), value=fill).reshape(*lead, L * (C + L))  # (..., L * (C + L))
    return flat[..., : L * (C + L - 1)].reshape(*lead, L, C + L - 1)  # (..., L, L + C - 1)


def _unskew(grad: torch.Tensor) -> torch.Tensor:
    """The inverse walk (pad the flat gradient by L, view as L rows of L + C, keep C columns): one pass
    over the gradient, where autograd's version of the forward zero-fills and copies the padded buffer."""
    *lead, L, W = grad.shape  # W = L + C - 1
    C = W - L + 1
    flat = F.pad(grad.reshape(*lead, L * W), (0, L))  # (..., L * (C + L))
    return flat.view(*lead, L, C + L)[..., :C]  # (..., L, C)


class _Skew(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, fill: float) -> torch.Tensor:
        return _skew(x, fill)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _unskew(grad), None


def skew(x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """(..., L, C) -> (..., L, L + C - 1) with ``out[..., i, i + c] = x[..., i, c]``, ``fill`` elsewhere."""
    return _Skew.apply(x, fill)


def _missing_keys(n_seq: int, seg_len: int, n_valid: int, s: int) -> int:
    """Key columns of segment s that lie before the first real position (memory holds ``n_valid``)."""
    return max(0, n_seq - n_valid - s * seg_len)


class _BandBias(torch.autograd.Function):
    """skew(pos, -inf) with the keys before the memory masked too (see :func:`band_bias`)."""

    @staticmethod
    def forward(ctx, pos: torch.Tensor, n_seg: int, n_valid: int) -> torch.Tensor:
        BS, H, L, C = pos.shape
        ctx.n_seg, ctx.n_valid = n_seg, n_valid
        bias = _skew(pos, float("-inf"))  # (B*S, H, L, n_seq + L)
        view = bias.view(BS // n_seg, n_seg, H, L, C - 1 + L)  # (B, S, H, L, n_seq + L)
        for s in range(n_seg):
            missing = _missing_keys(C - 1, L, n_valid, s)
            if missing == 0:
                break
            view[:, s, :, :, :missing] = float("-inf")
        return bias

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        g = _unskew(grad)  # (B*S, H, L, C), a fresh buffer
        BS, H, L, C = g.shape
        view = g.view(BS // ctx.n_seg, ctx.n_seg, H, L, C)  # (B, S, H, L, C)
        i = torch.arange(L, device=g.device)[:, None]
        c = torch.arange(C, device=g.device)[None, :]
        for s in range(ctx.n_seg):  # masked entries are constants: no gradient
            missing = _missing_keys(C - 1, L, ctx.n_valid, s)
            if missing == 0:
                break
            view[:, s].masked_fill_(i + c < missing, 0.0)  # key column of (i, c) is i + c
        return g, None, None


class _BandSoftmax(torch.autograd.Function):
    """softmax(q @ k^T + band_bias(pos)) built in one buffer, for training on CPU.

    Forward: -inf fill, the position logits written along the band through a strided view (the skew
    without a pad copy), the missing keys masked, the score matmul accumulated in place, one softmax.
    Backward: the softmax gradient, two matmuls, and the position gradient as a strided view of the
    score gradient. The probabilities are exactly 0 off the band, so that gradient is exact there too.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, n_seg: int, n_valid: int) -> torch.Tensor:
        BS, H, L, C = pos.shape
        W = k.shape[2]  # n_seq + L keys
        N = BS * H
        scores = torch.full((N, L, W), float("-inf"), dtype=q.dtype, device=q.device)  # (B*S*H, L, W)
        scores.as_strided((N, L, C), (L * W, W + 1, 1)).copy_(pos.reshape(N, L, C))  # [i, i + c] = pos[i, c]
        view = scores.view(BS // n_seg, n_seg, H, L, W)  # (B, S, H, L, W)
        for s in range(n_seg):
            missing = _missing_keys(C - 1, L, n_valid, s)
            if missing == 0:
                break
            view[:, s, :, :, :missing] = float("-inf")
        q3, k3 = q.reshape(N, L, -1), k.reshape(N, W, -1)  # (B*S*H, L, dh), (B*S*H, W, dh)
        p = torch.softmax(scores.baddbmm_(q3, k3.transpose(1, 2)), dim=-1)  # (B*S*H, L, W)
        ctx.save_for_backward(q3, k3, p)
        ctx.shapes = (q.shape, k.shape, pos.shape)
        return p.view(BS, H, L, W)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None, None]:
        q3, k3, p = ctx.saved_tensors
        q_shape, k_shape, pos_shape = ctx.shapes
        N, L, W = p.shape
        C = pos_shape[-1]
        gs = torch._softmax_backward_data(grad.reshape(N, L, W), p, -1, p.dtype)  # (B*S*H, L, W) contiguous
        gq = torch.bmm(gs, k3).view(q_shape) if ctx.needs_input_grad[0] else None
        gk = torch.bmm(gs.transpose(1, 2), q3).view(k_shape) if ctx.needs_input_grad[1] else None
        gpos = None
        if ctx.needs_input_grad[2]:  # the band of the score gradient: [i, i + c] -> [i, c], a view
            gpos = gs.as_strided((N, L, C), (L * W, W + 1, 1), gs.storage_offset()).view(pos_shape)
        return gq, gk, gpos, None, None


def band_softmax(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, n_seg: int, n_valid: int) -> torch.Tensor:
    """Attention probabilities of all segments: q (B*S, H, L, dh), k (B*S, H, n_seq + L, dh), position
    logits (B*S, H, L, C) -> (B*S, H, L, n_seq + L); equal to
    ``softmax(q @ k^T + band_bias(pos, n_seg, n_valid))``."""
    return _BandSoftmax.apply(q, k, pos, n_seg, n_valid)


def band_bias(pos: torch.Tensor, n_seg: int, n_valid: int) -> torch.Tensor:
    """Additive attention bias of all segments: (B*S, H, L, C) position logits -> (B*S, H, L, n_seq + L).

    ``pos[..., i, c]`` is the logit of query i for distance ``n_seq - c``. Key column j of segment s
    sits at position ``s * L - n_seq + j`` (0 = first query of the chunk), query i at ``s * L + i``;
    the key is visible when 0 <= query - key <= n_seq (the skew's -inf padding masks the rest) and it
    exists: memory holds ``n_valid`` real positions before the chunk, so the first columns of the
    first segments are -inf too. No separate mask tensor, no extra pass over the scores.
    """
    return _BandBias.apply(pos, n_seg, n_valid)


