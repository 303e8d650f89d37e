"""The MicroNet counting rules: one record per op kind, one rule table, the settings and results.

:func:`micronet.scoring.count.count` walks a list of op records (what the network computes per test token) and a table of
stored tensors, and turns them into a :class:`Score`. The two conventions share this code path; they
differ only in their :class:`Rules` entry in :data:`RULES`:

``paper``
    The MIT-HAN-Lab accounting of the original entry (spec section 7), which reproduces its published
    figures. Every multiply counts ``bits/32``; adds and "others" count 1 (32 bits); a FC layer has
    ``d_w (in-1) out + d_b out`` adds; LayerNorm is ``6d`` others; a softmax over n is ``3n - 1`` others;
    q.E and the attention softmax are counted once per layer; storage is ``nonzeros x bits/32`` for
    every weight, bias and position table plus a ``numel/32`` mask on each; LayerNorms are skipped;
    each activation quantizer stores ``1 + (32 - act_bits)/32``; per-channel scales are not counted.

``strict``
    The official rules applied fully: a multiply counts (widest input)/32, so the fp32 tail
    projections make the tail logits 32-bit and the fp32 position table makes q.E 32-bit; q.E and the
    attention softmax are counted per head; FC adds follow google-research ``counting.py``
    (``(d_w in - 1) out`` plus one per nonzero bias); a softmax is split into n exp + n div (others) and
    n - 1 adds; LayerNorm is counted term by term (3d + 2 mults, 4d - 1 adds, 1 rsqrt); the cache
    scales its logits by theta and mixes its mass into the model distribution; unquantized values
    (position tables, LayerNorms, cache scalars) are stored as fp32, LayerNorm parameters are counted,
    every weight scale (per output channel for linear weights and the tied softmax tables, per tensor
    for biases) is an fp32 value, an activation quantizer stores two fp32 values (scale and inverse),
    and masks are charged only on tensors that actually are sparse (density < 1), as in counting.py.

Units: "params" and "ops" are 32-bit equivalents; score = params / 159e6 + ops / 318e6.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from numbers import Integral
from typing import Literal, Sequence, Union

PARAMS_BASELINE = 159e6
OPS_BASELINE = 318e6

Width = Literal["act", "weight", "fp"]  # quantized activation, quantized weight, unquantized (fp32) value
TensorKind = Literal["weight", "bias", "pos", "norm", "scalar"]


@dataclass(frozen=True)
class TensorCount:
    """One stored tensor: shape, nonzeros (for storage) and density (for ops).

    ``density`` is what multiplies op counts; ``nonzeros`` is an integer count of stored values. For a
    measured tensor ``density == nonzeros / numel``; for a tensor described by a target sparsity the
    density is exact (1 - s) and ``nonzeros`` is that rounded half up.
    ``kind``: weight/bias (quantized with the model), pos (position table, never quantized), norm
    (LayerNorm parameter), scalar (cache lambda/theta, never masked). ``n_scales``: how many scale
    values the tensor needs once quantized.
    """

    name: str
    shape: tuple[int, ...]
    nonzeros: int
    density: float
    kind: TensorKind = "weight"
    n_scales: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def quantized(self) -> bool:
        """Stored at the weight bit width when the model is quantized."""
        return self.kind in ("weight", "bias")

    def __post_init__(self) -> None:
        if not 0 <= self.nonzeros <= self.numel:
            raise ValueError(f"{self.name}: nonzeros {self.nonzeros} outside [0, {self.numel}]")
        if not 0.0 <= self.density <= 1.0:
            raise ValueError(f"{self.name}: density {self.density} outside [0, 1]")


# ----------------------------------------------------------------------------- op records


@dataclass(frozen=True)
class FC:
    """``y = W x (+ b)`` with W (n_out x n_in); ``x`` is the input's width class; run for ``rate`` of tokens."""

    component: str
    weight: str
    n_in: int
    n_out: int
    bias: str | None = None
    x: Width = "act"
    rate: float = 1.0


@dataclass(frozen=True)
class Dots:
    """``count`` dot products of length ``length`` between two vectors of widths ``x`` and ``y``.

    ``extra_adds`` per dot product (e.g. adding the position logit to the content logit).
    ``heads > 1`` marks an op every head performs but the paper convention counts once per layer (q.E).
    ``tensor``: a stored operand (the position table) whose storage belongs to this component.
    """

    component: str
    count: int
    length: int
    x: Width = "act"
    y: Width = "act"
    extra_adds: int = 0
    heads: int = 1
    tensor: str | None = None


@dataclass(frozen=True)
class Softmax:
    """Softmax over ``n`` values (exp, sum, divide); ``heads`` as in :class:`Dots`."""

    component: str
    n: int
    heads: int = 1


@dataclass(frozen=True)
class LayerNorm:
    """LayerNorm over ``d`` features with affine parameters ``weight``/``bias``."""

    component: str
    d: int
    weight: str | None = None
    bias: str | None = None


@dataclass(frozen=True)
class ReLU:
    """``n`` elementwise max(x, 0) on fp32 accumulator outputs."""

    component: str
    n: int


@dataclass(frozen=True)
class Residual:
    """``n`` elementwise adds."""

    component: str
    n: int


@dataclass(frozen=True)
class Cache:
    """Neural cache over ``n`` stored (quantized) hidden states of width ``d``; ``scalars``: lambda/theta."""

    component: str
    n: int
    d: int
    scalars: str | None = None


@dataclass(frozen=True)
class ActQuantizers:
    """``n`` per-tensor activation quantizers (storage only: their ranges/scales)."""

    component: str
    n: int


Op = Union[FC, Dots, Softmax, LayerNorm, ReLU, Residual, Cache, ActQuantizers]


# ----------------------------------------------------------------------------- rule table


@dataclass(frozen=True)
class Rules:
    """How a convention turns op records and tensors into counts (see module docstring)."""

    mul_width: Literal["weight_bits", "widest_input"]
    per_head: bool  # ops with heads > 1 counted once per head (True) or once per layer
    fc_adds: Literal["paper", "counting_py"]  # d_w (in-1) out   vs   (d_w in - 1) out
    softmax_split: bool  # n - 1 of the 3n - 1 softmax ops are adds (True) or all "others"
    layernorm: Literal["6d_others", "exact"]
    cache_extras: bool  # theta scaling and mixing the cache mass into the model distribution
    mask: Literal["every_tensor", "sparse_only"]
    unquantized_width: Literal["weight_bits", "fp"]  # storage width of position tables / cache scalars
    count_norm_params: bool
    count_scales: bool
    quantizer_values: Literal["range+inverse", "fp32_pair"]
    allows_total_nonzeros: bool  # a measured total of nonzeros may replace per-tensor counts


RULES: dict[str, Rules] = {
    "paper": Rules(
        mul_width="weight_bits", per_head=False, fc_adds="paper", softmax_split=False, layernorm="6d_others",
        cache_extras=False, mask="every_tensor", unquantized_width="weight_bits", count_norm_params=False,
        count_scales=False, quantizer_values="range+inverse", allows_total_nonzeros=True,
    ),
    "strict": Rules(
        mul_width="widest_input", per_head=True, fc_adds="counting_py", softmax_split=True, layernorm="exact",
        cache_extras=True, mask="sparse_only", unquantized_width="fp", count_norm_params=True,
        count_scales=True, quantizer_values="fp32_pair", allows_total_nonzeros=False,
    ),
}
CONVENTIONS = tuple(RULES)


def _is_int(v: object) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


@dataclass(frozen=True)
class Settings:
    """What the model runs at: bit widths, cache size, test-set bin fractions, convention.

    ``bits``: weight bits (32 = unquantized). ``act_bits``: activation bits. ``free_16bit``: the
    challenge lets any value be assumed 16-bit at no accuracy cost; caps every storage, multiply and
    "other" width at 16 (adds still accumulate at 32). Off by default: the paper figures do not use it.
    """

    bits: int = 32
    act_bits: int = 32
    n_act_quantizers: int | None = None  # None: 7 per layer + 1 if act_bits < 32, else 0 (see build_ops)
    n_cache: int = 0
    bin_fractions: tuple[float, ...] | None = None
    convention: str = "paper"
    free_16bit: bool = False

    def __post_init__(self) -> None:
        if self.convention not in RULES:
            raise ValueError(f"unknown convention {self.convention!r}; expected one of {list(CONVENTIONS)}")
        for name in ("bits", "act_bits"):
            v = getattr(self, name)
            if not _is_int(v) or not 1 <= v <= 32:
                raise ValueError(f"{name} must be an integer in 1..32 (32 = unquantized), got {v!r}")
        if not _is_int(self.n_cache) or self.n_cache < 0:
            raise ValueError(f"n_cache must be an integer >= 0 (0 = no cache), got {self.n_cache!r}")
        if self.n_act_quantizers is not None and (not _is_int(self.n_act_quantizers) or self.n_act_quantizers < 0):
            raise ValueError(f"n_act_quantizers must be an integer >= 0, got {self.n_act_quantizers!r}")
        for name in ("bits", "act_bits", "n_cache", "n_act_quantizers"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))
        if self.bin_fractions is not None:
            fr = tuple(float(f) for f in self.bin_fractions)
            if any(not f >= 0.0 for f in fr):
                raise ValueError(f"bin_fractions must be non-negative, got {fr}")
            if abs(sum(fr) - 1.0) > 1e-6:
                raise ValueError(f"bin_fractions must sum to 1 (fractions of test tokens per bin), got sum {sum(fr):.6g}")
            object.__setattr__(self, "bin_fractions", fr)

    @property
    def rules(self) -> Rules:
        return RULES[self.convention]

    @property
    def w(self) -> int:
        """Effective weight width."""
        return min(self.bits, 16) if self.free_16bit else self.bits

    @property
    def a(self) -> int:
        """Effective activation width."""
        return min(self.act_bits, 16) if self.free_16bit else self.act_bits

    @property
    def fp(self) -> int:
        """Effective width of unquantized values."""
        return 16 if self.free_16bit else 32


@dataclass
class Row:
    """Counts of one component. ``muls`` is a raw count; ``mul_ops`` the same weighted by width/32."""

    component: str
    params: float = 0.0
    muls: float = 0.0
    mul_ops: float = 0.0
    adds: float = 0.0
    others: float = 0.0

    @property
    def ops(self) -> float:
        return self.mul_ops + self.adds + self.others

    def to_json(self) -> dict:
        return {**asdict(self), "ops": self.ops}


@dataclass(frozen=True)
class Score:
    """A MicroNet score with its per-component breakdown (32-bit-equivalent units)."""

    convention: str
    params: float
    ops: float
    muls: float
    mul_ops: float
    adds: float
    others: float
    score: float
    rows: tuple[Row, ...]
    settings: Settings = field(default_factory=Settings)

    def to_json(self) -> dict:
        """Plain-JSON dict: totals, settings and one entry per component."""
        s = self.settings
        return {
            "convention": self.convention, "params": self.params, "ops": self.ops, "muls": self.muls,
            "mul_ops": self.mul_ops, "adds": self.adds, "others": self.others, "score": self.score,
            "settings": {"bits": s.bits, "act_bits": s.act_bits, "n_act_quantizers": s.n_act_quantizers,
                         "n_cache": s.n_cache,
                         "bin_fractions": list(s.bin_fractions) if s.bin_fractions else None,
                         "free_16bit": s.free_16bit},
            "components": [r.to_json() for r in self.rows],
        }


def group_rows(rows: Sequence[Row]) -> list[Row]:
    """Merge ``layers.<L>.<x>`` rows into ``layers.*.<x>`` (sums over layers)."""
    out: dict[str, Row] = {}
    for r in rows:
        parts = r.component.split(".")
        key = ".".join(["layers", "*", *parts[2:]]) if parts[0] == "layers" and parts[1].isdigit() else r.component
        g = out.setdefault(key, Row(key))
        for f in ("params", "muls", "mul_ops", "adds", "others"):
            setattr(g, f, getattr(g, f) + getattr(r, f))
    return list(out.values())
