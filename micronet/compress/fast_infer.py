"""Fast CPU inference for a compressed (pruned, quantized) TransformerLM.

    model = build_fast_model("results/<quantize run>/packed.safetensors")  # int8 kernels (default)
    model = build_fast_model(load_export(path), backend="fp32")           # fp32, no fake quantization
    python -m micronet.evaluate name=<run> fast=true                     # the evaluate stage, fast path

The exported model evaluates with *fake* quantization: fp32 weights that happen to be code x scale,
plus a quantize-dequantize op on 7 activations per layer (and an explicit attention softmax for one of
them), so it is slower than its dense fp32 parent. Here:

* the effective weights (masks and quantizers applied) are copied into a plain TransformerLM and the
  activation fake quantizers are left out (attention goes back to the fused SDPA kernel);
* ``backend="int8"``: every ``nn.Linear`` of the blocks becomes an :class:`Int8Linear`: plain
  ``torch.int8`` weight codes with one fp32 scale per output channel (symmetric, max|row| / 127), and
  activations quantized per call and per row (token) to symmetric int8, multiplied by ``torch._int_mm``
  (int8 x int8 -> int32, oneDNN on CPU) and rescaled in fp32. No ``torch.ao`` module, no quantized dtype.
  9-bit codes (|c| <= 255) are rounded to 8 bits, a second rounding that costs a little perplexity
  (measured by ``bench/compressed_inference.py``);
* the tied adaptive softmax is replaced by :class:`FastAdaptiveLogSoftmax`: head words and cluster
  logits in one matmul, no concatenation (int8 copies of the tied tables with ``backend="int8"``; the
  fp32 tables stay for the input embedding);
* attention runs in blocks of ``segment_len=32`` queries (n_seq + 32 keys each) instead of the model's
  (96 + 96 for the 8.3M models): 31 masked-out scores per query instead of 95, the same band attention
  (equal up to float rounding).

The result has the API :func:`micronet.model.evaluation.evaluate_stream` uses (``model(x, mem)``,
``target_log_probs``, ``log_probs``, ``.cfg``), so evaluation with carried memory and the eval cache
runs unchanged. It is for inference only (no gradients; the int8 modules have none).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from micronet.compress.checkpoint import load_export
from micronet.compress.export import effective, plain_names
from micronet.model.adaptive import AdaptiveLogSoftmax, full_log_probs
from micronet.model.cache import CacheConfig, attach_cache, model_cache
from micronet.model.transformer import TransformerLM
from micronet.runs.config import ConfigError, MicronetError

BACKENDS = ("int8", "fp32")
DEFAULT_SEGMENT_LEN = 32  # attention blocks of n_seq + 32 keys, not n_seq + 96: +11% for dense fp32 too, same loss
HEAD_ROWS = 1024  # softmax rows per block: (1024, |bin_0|) logits instead of (4032, ...), 56 MB less peak RSS
INT8_MAX = 127  # symmetric int8 codes in [-127, 127] (-128 unused: the range stays symmetric)


def int8_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of each row of ``x`` (N, K) and their scales (N, 1): x ~= codes * scale."""
    amax = x.abs().amax(dim=1, keepdim=True)  # (N, 1)
    scale = amax.clamp_min(torch.finfo(torch.float32).tiny) / INT8_MAX  # an all-zero row: codes 0
    return x.div(scale).round_().to(torch.int8), scale


class Int8Linear(nn.Module):
    """``x @ weight.T + bias`` (then ReLU with ``relu``) as an int8 x int8 matrix product.

    Weights: per-output-channel symmetric int8 codes, stored transposed (in, out) as ``torch._int_mm``
    wants them, and their fp32 scales. Activations: per-row (token) symmetric int8, quantized per call.
    The int32 products are rescaled by (row scale x channel scale) in fp32, plus the fp32 bias.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool = False):
        super().__init__()
        codes, scale = int8_codes(weight.detach().float())
        self.in_features, self.out_features, self.relu = weight.shape[1], weight.shape[0], relu
        self.register_buffer("codes_t", codes.t())  # (in, out), a transposed view of the (out, in) codes
        self.register_buffer("scale", scale.reshape(-1))  # (out,)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (N, in)
        q, s = int8_codes(rows.float())
        out = torch._int_mm(q, self.codes_t).float().mul_(s).mul_(self.scale)  # (N, out)
        if self.bias is not None:
            out.add_(self.bias)
        if self.relu:
            out.clamp_min_(0.0)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, relu={self.relu}"


def int8_linear(weight: torch.Tensor, bias: torch.Tensor | None, relu: bool = False) -> Int8Linear:
    """An :class:`Int8Linear` computing ``x @ weight.T + bias`` (then ReLU with ``relu``)."""
    return Int8Linear(weight, bias, relu)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, backend: str) -> nn.Module:
    """``weight``/``bias`` as an int8 dynamic or a frozen fp32 Linear."""
    if backend == "int8":
        return int8_linear(weight, bias)
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin.requires_grad_(False)


def _project(proj: nn.Module, backend: str) -> nn.Module:
    return proj if isinstance(proj, nn.Identity) else _linear(proj.weight, None, backend)


class FastAdaptiveLogSoftmax(nn.Module):
    """Inference copy of a tied :class:`AdaptiveLogSoftmax` (same methods, same results up to rounding).

    ``head``: the bin-0 words and the tail-cluster logits as one (|bin_0| + n_tails, d) matrix, so a
    single GEMM and no concatenation; ``tails[i - 1]``: projection then word logits of tail bin i.
    """

    def __init__(self, sm: AdaptiveLogSoftmax, backend: str):
        super().__init__()
        self.edges, self.n_bins = list(sm.edges), sm.n_bins
        w, b = [sm.table(0)], [sm.biases[0]]
        if sm.cluster is not None:
            w.append(sm.cluster.weight)
            b.append(sm.cluster.bias)
        self.head_proj = _project(sm.projs[0], backend)
        self.head = _linear(torch.cat(w).detach(), torch.cat(b).detach(), backend)
        self.tails = nn.ModuleList(
            nn.Sequential(_project(sm.projs[i], backend), _linear(sm.table(i).detach(), sm.biases[i].detach(), backend))
            for i in range(1, self.n_bins))

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(N, d_model) -> (N, |bin_0| + n_bins - 1)."""
        return self.head(self.head_proj(h)).float()

    def head_log_probs(self, h: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.head_logits(h), dim=-1)

    def tail_log_probs(self, h: torch.Tensor, i: int) -> torch.Tensor:
        return F.log_softmax(self.tails[i - 1](h).float(), dim=-1)

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """Full distribution: (N, d_model) -> (N, vocab_size)."""
        return full_log_probs(self, h)

    def target_log_probs(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """log p(target): (N, d_model), (N,) -> (N,) float32; each tail only for the rows that need it."""
        if len(h) > HEAD_ROWS:  # row blocks: same speed, a quarter of the logits' peak memory at chunk 4032
            return torch.cat([self.target_log_probs(h[a : a + HEAD_ROWS], target[a : a + HEAD_ROWS])
                              for a in range(0, len(h), HEAD_ROWS)])
        head = self.head_log_probs(h)  # (N, |bin_0| + n_tails)
        n_head = self.edges[1]
        col = target.clone()  # the target's own head column, or its tail's cluster column
        for i in range(1, self.n_bins):
            col[(target >= self.edges[i]) & (target < self.edges[i + 1])] = n_head + i - 1
        out = head.gather(1, col[:, None]).squeeze(1)
        for i in range(1, self.n_bins):
            lo, hi = self.edges[i], self.edges[i + 1]
            rows = ((target >= lo) & (target < hi)).nonzero(as_tuple=True)[0]
            if rows.numel():
                out[rows] += self.tail_log_probs(h[rows], i).gather(1, (target[rows] - lo)[:, None]).squeeze(1)
        return out


def plain_copy(model: nn.Module, segment_len: int | None = None) -> TransformerLM:
    """A TransformerLM holding ``model``'s effective weights, without masks or fake quantizers
    (``segment_len``: its attention block length instead of the model's; results do not depend on it)."""
    cfg = dataclasses.replace(model.cfg, cutoffs=list(model.cfg.cutoffs), bin_dims=list(model.cfg.bin_dims))
    if segment_len is not None:
        cfg.segment_len = int(segment_len)
    out = TransformerLM(cfg)
    cache = model_cache(model)
    if cache is not None:  # its two scalars are part of the plain state
        attach_cache(out, CacheConfig(n_cache=cache.n_cache, learnable=isinstance(cache.theta_param, nn.Parameter)))
    with torch.no_grad():
        out.load_state_dict({n: effective(model, n).float().cpu() for n in plain_names(model)})
    return out.eval().requires_grad_(False)


def _replace_linears(module: nn.Module) -> int:
    """Every nn.Linear below ``module`` -> int8 (a Linear followed by a ReLU in a Sequential: fused,
    the ReLU replaced by Identity so indices stay); returns how many."""
    n = 0
    children = list(module.named_children())
    for k, (name, child) in enumerate(children):
        if type(child) is nn.Linear:
            relu = isinstance(module, nn.Sequential) and k + 1 < len(children) and type(children[k + 1][1]) is nn.ReLU
            setattr(module, name, int8_linear(child.weight, child.bias, relu=relu))
            if relu:
                setattr(module, children[k + 1][0], nn.Identity())
            n += 1
        elif not isinstance(child, nn.Identity):
            n += _replace_linears(child)
    return n


def build_fast_model(source: str | Path | nn.Module, backend: str = "int8", int8_head: bool = True,
                     segment_len: int | None = DEFAULT_SEGMENT_LEN) -> TransformerLM:
    """The inference model of ``source``, a packed export (``packed.safetensors`` or a legacy ``model.mnq``)
    or any TransformerLM (fp32, pruned or fake-quantized; not modified).

    ``backend``: ``int8`` (:class:`Int8Linear` layers) or ``fp32`` (plain dense fp32
    weights, no fake quantization). ``int8_head=False`` keeps the softmax in fp32 with the int8 backend.
    ``segment_len``: attention queries per block (None: the model's own); exact attention either way.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"fast backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(source, (str, Path)):
        source = load_export(Path(source))
    if not isinstance(source, TransformerLM):
        raise MicronetError(f"build_fast_model needs a TransformerLM or a packed export path, got {type(source).__name__}")
    if segment_len is not None and segment_len < 1:
        raise ConfigError(f"segment_len must be positive, got {segment_len}")
    model = plain_copy(source, segment_len)
    head_backend = backend if int8_head else "fp32"
    model.softmax = FastAdaptiveLogSoftmax(model.softmax, head_backend)
    n_int8 = _replace_linears(model.layers) if backend == "int8" else 0
    model.fast = {"backend": backend, "kernel": "torch._int_mm" if backend == "int8" else None,
                  "int8_head": head_backend == "int8", "int8_linears": n_int8, "segment_len": model.cfg.segment_len}
    return model


__all__ = ["FastAdaptiveLogSoftmax", "Int8Linear", "build_fast_model", "int8_codes", "int8_linear", "plain_copy"]
