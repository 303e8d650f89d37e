"""The MicroNet core language model: a pre-LayerNorm Transformer with sliding-window attention.

Every query attends to itself and the ``n_seq`` positions before it (span ``C = n_seq + 1``),
with a learned relative-position table per layer shared by the heads:

    logit(t, j) = (q_t . k_j + q_t . E[:, t - j]) / sqrt(d_head),   0 <= t - j <= n_seq.

A sequence is cut into segments of ``segment_len`` queries. Each segment attends to its own
keys plus the ``n_seq`` keys before it, so the attention costs O(T * (segment_len + n_seq))
instead of O(T^2), and all segments of a chunk run as one batched call. Keys/values of the last
``n_seq`` positions are returned as :class:`Memory` so evaluation can carry them across chunks.

Kernels (:mod:`micronet.model.band_attention`): fp32 inference, and training on CUDA, run
``scaled_dot_product_attention`` with an additive band bias; training and bf16 inference on CPU build the
band softmax in one buffer with hand-written backward passes and hash dropout (:mod:`micronet.model.dropout`),
1.3-1.7x faster per attention layer (``bench/attention.py``). Both paths are tested against the
definition above, values and gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from micronet.model.adaptive import AdaptiveEmbedding, AdaptiveLogSoftmax, init_adaptive
from micronet.model.band_attention import band_bias, band_softmax, windows
from micronet.model.dropout import Dropout, dropout


@dataclass
class ModelConfig:
    """Architecture of :class:`TransformerLM` (paper names)."""

    vocab_size: int = 0  # 0: taken from the data at run time
    d_model: int = 256
    n_layer: int = 8
    n_head: int = 8
    d_head: int = 24
    d_ff: int = 768
    n_seq: int = 96  # previous positions each query sees; attention span C = n_seq + 1
    segment_len: int = 96  # queries per attention block
    cutoffs: list[int] = field(default_factory=lambda: [3500, 25000])
    bin_dims: list[int] = field(default_factory=lambda: [256, 64, 4])
    dropout: float = 0.0
    init_std: float = 0.02

    @property
    def attn_span(self) -> int:
        """C: the number of keys each query sees."""
        return self.n_seq + 1

    def validate(self) -> None:
        """Raise ValueError with a clear message on an impossible configuration."""
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "d_head", "d_ff", "n_seq", "segment_len"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if len(self.bin_dims) != len(self.cutoffs) + 1 or min(self.bin_dims) < 1:
            raise ValueError(f"model.bin_dims needs {len(self.cutoffs) + 1} positive dims, got {self.bin_dims}")
        edges = [0, *self.cutoffs, self.vocab_size]
        if any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"model.cutoffs must increase strictly below vocab_size={self.vocab_size}: {self.cutoffs}")


@dataclass
class Memory:
    """Keys/values of the last ``n_seq`` positions of every layer, right-aligned.

    ``kv[l]`` has shape (B, n_seq, 2, n_head, d_head); only the last ``n_valid`` slots hold
    real positions (the rest is masked), so a fresh sequence starts with ``n_valid = 0``.
    """

    kv: list[torch.Tensor]
    n_valid: int

    def detach(self) -> "Memory":
        """A copy cut from the autograd graph, for carrying across chunks."""
        return Memory([t.detach() for t in self.kv], self.n_valid)


class WindowAttention(nn.Module):
    """Multi-head sliding-window attention with a relative position table shared by heads."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.d_head, self.n_seq = cfg.n_head, cfg.d_head, cfg.n_seq
        self.segment_len = cfg.segment_len
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.n_head * cfg.d_head)
        self.out = nn.Linear(cfg.n_head * cfg.d_head, cfg.d_model, bias=False)
        self.pos = nn.Parameter(torch.zeros(cfg.d_head, cfg.attn_span))  # E[:, distance]
        # Optional module applied to the attention probabilities (micronet.quantize puts a fake
        # quantizer here); None keeps the fused scaled_dot_product_attention.
        self.act_probs: nn.Module | None = None

    def forward(self, x: torch.Tensor, mem: torch.Tensor | None, n_valid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, d_model), mem: (B, n_seq, 2, H, dh) or None -> (out (B, T, d_model), new mem)."""
        B, T, _ = x.shape
        H, dh, M = self.n_head, self.d_head, self.n_seq
        L = min(self.segment_len, T)
        S = -(-T // L)  # segments, the last one padded
        qkv = self.qkv(x).view(B, T, 3, H, dh)  # (B, T, 3, H, dh)
        q, kv = qkv[:, :, 0], qkv[:, :, 1:]  # (B, T, H, dh), (B, T, 2, H, dh)
        if mem is None:
            mem = kv.new_zeros(B, M, 2, H, dh)
            n_valid = 0
        kv_all = torch.cat([mem.to(kv.dtype), kv], dim=1)  # (B, M + T, 2, H, dh)
        new_mem = kv_all[:, T:]  # (B, M, 2, H, dh): the last n_seq positions
        pad = S * L - T
        if pad:
            kv_all = F.pad(kv_all, (0, 0, 0, 0, 0, 0, 0, pad))  # (B, M + S*L, 2, H, dh)
            q = F.pad(q, (0, 0, 0, 0, 0, pad))  # (B, S*L, H, dh)
        k, v = windows(kv_all, M, L)  # (B*S, H, M+L, dh) each: segment s sees keys [s*L, s*L + M + L)
        # 1/sqrt(dh) on the queries once, instead of on two (B*S, H, L, M+L) logit tensors.
        q = q.view(B, S, L, H, dh).transpose(2, 3).reshape(B * S, H, L, dh) * dh**-0.5  # (B*S, H, L, dh)
        # Position logits q . E[:, n_seq - c] (E's columns reversed): skewing then aligns row i's
        # distances with key columns i .. i + n_seq.
        pos = torch.matmul(q, self.pos.flip(-1).to(q.dtype))  # (B*S, H, L, C)
        # CPU: the explicit band softmax for training, and for bf16 inference too (1.4x SDPA's bf16 CPU kernel
        # per layer at batch-1 evaluation shapes, measured 8.4 vs 12.1 ms; in fp32 SDPA is 5% faster).
        explicit = x.device.type == "cpu" and (torch.is_grad_enabled() or q.dtype == torch.bfloat16)
        if self.act_probs is None and not explicit:
            bias = band_bias(pos, S, n_valid)  # (B*S, H, L, M+L)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0, scale=1.0
            )  # (B*S, H, L, dh)
        else:
            # Explicit probabilities: for act_probs (e.g. quantized probabilities), and for CPU training,
            # where SDPA falls back to a math path with a separate bias, a NaN-guarded softmax and a slow
            # Bernoulli dropout (bench/attention.py).
            p = band_softmax(q, k, pos, S, n_valid)  # (B*S, H, L, M+L)
            if self.act_probs is not None:
                p = self.act_probs(p)
            y = torch.matmul(dropout(p, self.dropout, self.training), v)  # (B*S, H, L, dh)
        y = y.view(B, S, H, L, dh).transpose(2, 3).reshape(B, S * L, H * dh)[:, :T]  # (B, T, H*dh)
        return self.out(y), new_mem


class Block(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln(x)), then x + ffn(ln(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = WindowAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.d_ff), nn.ReLU(), nn.Linear(cfg.d_ff, cfg.d_model), Dropout(cfg.dropout)
        )

    def forward(self, x: torch.Tensor, mem: torch.Tensor | None, n_valid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, d_model) -> (B, T, d_model), new memory of this layer."""
        a, new_mem = self.attn(self.ln1(x), mem, n_valid)
        x = x + a
        return x + self.ffn(self.ln2(x)), new_mem


class TransformerLM(nn.Module):
    """Adaptive input -> n_layer blocks -> tied adaptive softmax (no final LayerNorm)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = AdaptiveEmbedding(cfg.vocab_size, cfg.d_model, list(cfg.cutoffs), list(cfg.bin_dims))
        self.drop = Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.softmax = AdaptiveLogSoftmax(self.embed)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every weight (N(0, init_std) linears and position tables, zero biases)."""
        std = self.cfg.init_std
        for layer in self.layers:
            for m in layer.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=std)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
            nn.init.normal_(layer.attn.pos, std=std)
        init_adaptive(self.embed, self.softmax, std)

    def forward(self, idx: torch.Tensor, memory: Memory | None = None) -> tuple[torch.Tensor, Memory]:
        """idx: (B, T) token ids -> final hidden states (B, T, d_model) and the new memory."""
        x = self.drop(self.embed(idx) * math.sqrt(self.cfg.d_model))  # (B, T, d_model)
        n_valid = memory.n_valid if memory is not None else 0
        new_kv = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, memory.kv[i] if memory is not None else None, n_valid)
            new_kv.append(kv)
        return x, Memory(new_kv, min(self.cfg.n_seq, n_valid + idx.shape[1]))

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """Full next-word log-probabilities: (..., d_model) -> (..., vocab_size)."""
        return self.softmax.log_probs(h.reshape(-1, h.shape[-1])).view(*h.shape[:-1], -1)

    def target_log_probs(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """log p(target): h (..., d_model), target (...) -> (...) float32."""
        flat = self.softmax.target_log_probs(h.reshape(-1, h.shape[-1]), target.reshape(-1))  # (N,)
        return flat.view(target.shape)


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameter values (tied tensors counted once)."""
    return sum(p.numel() for p in model.parameters())
