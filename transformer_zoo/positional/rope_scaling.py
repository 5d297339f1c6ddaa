"""RoPE length-extension schemes, passed to ``RotaryEmbedding(scaling=...)``.

Each is a frozen, keyword-only description whose ``frequencies(dim, base, seq_len)`` gives the
per-dimension θ'_i (double-double, for the exact int64 angles) and ``attention_scaling()``
the factor HF multiplies cos and sin by (so q and k each; the logits by its square):

- ``YaRNScaling``: Peng et al. 2023, arXiv 2309.00071 (NTK-by-parts ramp + temperature).
- ``DynamicNTKScaling``: base·(s·L/L₀ − (s − 1))^(r/(r−2)) at the current length L > L₀.
- ``Llama3Scaling``: Llama 3.1's wavelength bands (Meta 2024).
- ``LongRoPEScaling``: Ding et al. 2024, arXiv 2402.13753 (given short / long factors).

The formulas are in ``transformer_zoo.functional.rope_scaling``; every scheme equals
transformers' ``ROPE_INIT_FUNCTIONS`` for the same config to fp32 rounding (tested). Static
linear interpolation and NTK-aware base rescaling stay ``RotaryEmbedding``'s
``interpolation_factor`` and ``ntk_factor``.

Length-dependent schemes (``uses_length``: dynamic NTK, LongRoPE's short/long switch) read the
current length L = max position + 1 of each call, as HF does (one host sync per call).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from transformer_zoo._checks import check_positive_int
from transformer_zoo.functional import rope_scaling as F
from transformer_zoo.functional.rotary_phase import frequencies_double_double

Frequencies = F.Frequencies


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Base of the length-extension schemes. Subclasses implement ``frequencies``."""

    #: True: the frequencies depend on the current length (``seq_len``).
    uses_length: ClassVar[bool] = False

    def frequencies(self, dim: int, base: float, seq_len: int | None) -> Frequencies:
        """θ'_i for ``dim`` rotated channels as (θ_hi, θ_lo) tuples of r/2 floats."""
        raise NotImplementedError  # pragma: no cover - abstract

    def attention_scaling(self) -> float:
        """The factor on cos/sin (HF's ``attention_scaling``); 1 unless the scheme has one."""
        return 1.0

    def check_dim(self, dim: int) -> None:
        """Raise ValueError when the scheme is not defined for ``dim`` rotated channels."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class YaRNScaling(RopeScaling):
    """YaRN: θ'_i = (r(i)/s + 1 − r(i))·θ_i, r(i) = clamp((i − lo)/(hi − lo), 0, 1) with lo/hi
    the dimensions turning β_fast / β_slow times over L₀; cos/sin times
    0.1·ln s + 1 (or mscale(s, mscale)/mscale(s, mscale_all_dim)) unless
    ``attention_factor`` is given. Peng, Quesnelle, Fan, Shippole 2023, arXiv 2309.00071.

    Args:
        factor: s = new context / L₀ (>= 1).
        original_max_position_embeddings: L₀, the pretraining context.
        beta_fast, beta_slow: β (rotations over L₀) at the ramp's ends (32 and 1).
        mscale, mscale_all_dim: DeepSeek's attention-factor form (used when both are given).
        attention_factor: an explicit factor on cos/sin.
        truncate: floor/ceil the ramp ends to whole dimensions (HF's default True).
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        F._check_yarn(2, 10000.0, self.factor, self.original_max_position_embeddings,
                      self.beta_fast, self.beta_slow, self.truncate)
        for name in ("mscale", "mscale_all_dim"):
            if getattr(self, name) is not None:
                F._check_number(getattr(self, name), name, strict=False)
        if self.attention_factor is not None:
            F._check_number(self.attention_factor, "attention_factor")

    def frequencies(self, dim: int, base: float, seq_len: int | None) -> Frequencies:
        args = F._check_yarn(dim, base, self.factor, self.original_max_position_embeddings,
                             self.beta_fast, self.beta_slow, self.truncate)
        return F._yarn(*args)

    def attention_scaling(self) -> float:
        if self.attention_factor is not None:
            return float(self.attention_factor)
        return F.yarn_attention_factor(self.factor, mscale=self.mscale,
                                       mscale_all_dim=self.mscale_all_dim)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DynamicNTKScaling(RopeScaling):
    """Dynamic NTK: base' = base·(s·L/L₀ − (s − 1))^(r/(r−2)) for the current length
    L = max position + 1 > L₀ (base itself up to L₀); no attention factor.

    The base follows the positions of each call, as in HF: keys rotated in an earlier call
    (a cache of rotated keys) keep the base of their time while new queries use the new one
    (transformers#25104). Keys re-rotated from their positions at every call are consistent.

    Args:
        factor: s (>= 1).
        max_position_embeddings: L₀ (HF reads ``config.max_position_embeddings``).
    """

    uses_length: ClassVar[bool] = True
    factor: float
    max_position_embeddings: int

    def __post_init__(self) -> None:
        F._check_factor(self.factor, "factor")
        check_positive_int(self.max_position_embeddings, "max_position_embeddings")

    def base_at(self, dim: int, base: float, seq_len: int | None) -> float:
        """base' at length ``seq_len`` (None: L₀, so base)."""
        length = self.max_position_embeddings if seq_len is None else seq_len
        return F.dynamic_ntk_base(base, dim, factor=self.factor, seq_len=length,
                                  max_position_embeddings=self.max_position_embeddings)

    def frequencies(self, dim: int, base: float, seq_len: int | None) -> Frequencies:
        return frequencies_double_double(dim, self.base_at(dim, base, seq_len))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Llama3Scaling(RopeScaling):
    """Llama 3.1: θ'_i = θ_i for wavelengths 2π/θ_i < L₀/high_freq_factor, θ_i/s above
    L₀/low_freq_factor, (1 − σ)θ_i/s + σθ_i between, σ = (L₀·θ_i/2π − low)/(high − low).
    No attention factor. Defaults: Llama 3.1's (8, 1, 4, 8192)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        self._args(2, 10000.0)

    def _args(self, dim: int, base: float) -> tuple:
        return F._check_llama3(dim, base, self.factor, self.low_freq_factor,
                               self.high_freq_factor, self.original_max_position_embeddings)

    def frequencies(self, dim: int, base: float, seq_len: int | None) -> Frequencies:
        return F._llama3(*self._args(dim, base))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LongRoPEScaling(RopeScaling):
    """LongRoPE: θ'_i = θ_i / f_i with f = ``short_factor`` while the current length
    L = max position + 1 is at most L₀, ``long_factor`` beyond (HF's switch); cos/sin times
    √(1 + ln s / ln L₀) (1 for s <= 1) unless ``attention_factor`` is given.
    Ding et al. 2024, arXiv 2402.13753 (Phi-3's form).

    Args:
        short_factor, long_factor: r/2 positive factors each.
        original_max_position_embeddings: L₀.
        factor: s = new context / L₀ (HF: max_position_embeddings / L₀ when absent), used
            for the attention factor only.
        attention_factor: an explicit factor on cos/sin (then ``factor`` may be omitted).
    """

    uses_length: ClassVar[bool] = True
    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    factor: float | None = None
    attention_factor: float | None = None

    def __post_init__(self) -> None:
        check_positive_int(self.original_max_position_embeddings,
                           "original_max_position_embeddings")
        short, long = tuple(self.short_factor), tuple(self.long_factor)
        if len(short) != len(long):
            raise ValueError(
                f"long_factor: expected as many factors as short_factor ({len(short)}), got "
                f"{len(long)}"
            )
        dim = 2 * len(short)
        object.__setattr__(self, "short_factor", F.check_longrope_factors(short, dim,
                                                                          "short_factor"))
        object.__setattr__(self, "long_factor", F.check_longrope_factors(long, dim,
                                                                         "long_factor"))
        if self.factor is None and self.attention_factor is None:
            raise ValueError(
                "LongRoPEScaling: expected factor (s = new context / "
                "original_max_position_embeddings) or attention_factor, got neither"
            )
        if self.factor is not None:
            F._check_number(self.factor, "factor")
        if self.attention_factor is not None:
            F._check_number(self.attention_factor, "attention_factor")

    def check_dim(self, dim: int) -> None:
        if dim != 2 * len(self.short_factor):
            raise ValueError(
                f"LongRoPEScaling: its {len(self.short_factor)} factors need rotary_dim "
                f"{2 * len(self.short_factor)}, got {dim}"
            )

    def frequencies(self, dim: int, base: float, seq_len: int | None) -> Frequencies:
        self.check_dim(dim)
        long = seq_len is not None and seq_len > self.original_max_position_embeddings
        factors = self.long_factor if long else self.short_factor
        return F._longrope(dim, F._check_base(base), factors)

    def attention_scaling(self) -> float:
        if self.attention_factor is not None:
            return float(self.attention_factor)
        return F.longrope_attention_factor(self.factor, self.original_max_position_embeddings)
