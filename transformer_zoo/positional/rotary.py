"""Rotary position embedding (RoPE), a q/k transform.

    q_m ← R_m q_m,   k_n ← R_n k_n,   R_p = ⊕_i [[cos pθ_i, −sin pθ_i], [sin pθ_i, cos pθ_i]]
    θ_i = base^(−2i/r),  so  (R_m q)ᵀ(R_n k) = qᵀ R_(n−m) k  depends only on n − m

Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding",
arXiv 2104.09864 (eq. 13-16; eq. 19 for linear attention). Exact rotation; the angles
(p/s)·θ_i mod 2π are exact for every int64 position (real θ_i = base'^(−2i/r)) and rounded once
to fp32 (see ``transformer_zoo.functional.rotary`` and ``rotary_phase``).

Options: both channel layouts (``RotaryLayout``), partial rotary (only the first
``rotary_dim`` channels rotate), base θ, linear position interpolation (positions / s; Chen et
al. 2023, arXiv 2306.15595), NTK-aware base rescaling (base·s^(r/(r−2))), and the length
extensions of ``positional.rope_scaling`` (``scaling=``: YaRN, dynamic NTK, Llama 3.1,
LongRoPE: per-dimension θ'_i = g_i·θ_i and a factor on cos/sin). ``from_hf_config`` builds one
from a transformers config or its ``rope_parameters`` / ``rope_scaling`` dict.

Shapes: b batch, h heads, n/m lengths, d head dim, w channels. q ``(b, h, n, d)``, k
``(b, h_kv, m, d)``, positions int64 ``(n,)`` or ``(b, n)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from transformer_zoo._checks import check_positive_int
from transformer_zoo.functional.rotary import (
    RotaryLayout,
    _check_even_dim,
    _check_factor,
    _check_layout,
    apply_rotary_angles,
    apply_rotary_tables,
    check_rotary_input,
    exact_rotary_angles,
    ntk_scaled_base,
    rotary_frequencies,
    rotary_tables,
)
from transformer_zoo.functional.rotary_theta import exact_angles_for_frequencies
from transformer_zoo.positional.base import QKTransform
from transformer_zoo.positional.rope_scaling import RopeScaling


def check_rotary_sizes(head_dim: int, rotary_dim: int | None, base: float) -> int:
    """Validate the sizes every rotary encoding takes; return rotary_dim (head_dim if None)."""
    check_positive_int(head_dim, "head_dim")
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    _check_even_dim(rotary_dim, "rotary_dim")
    if rotary_dim > head_dim:
        raise ValueError(f"rotary_dim: expected at most head_dim={head_dim}, got {rotary_dim}")
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 1:
        raise ValueError(f"base: expected a number > 1, got {base!r}")
    return rotary_dim


class RotaryEmbedding(QKTransform):
    """RoPE on queries and keys; no parameters.

    Args:
        head_dim: channels per head d.
        rotary_dim: rotated channels r (even, <= head_dim; default head_dim); the other
            d − r channels pass through unchanged.
        base: the θ base (10000 in RoFormer; 500000 in Llama 3).
        layout: ``RotaryLayout.INTERLEAVED`` (pairs (2i, 2i+1), the paper's) or
            ``RotaryLayout.HALF_SPLIT`` (pairs (i, i + r/2), GPT-NeoX/Llama).
        interpolation_factor: s >= 1; positions are divided by s (linear interpolation).
        ntk_factor: s >= 1; base becomes base·s^(r/(r−2)) (NTK-aware scaling).
        scaling: a ``RopeScaling`` (``YaRNScaling``, ``DynamicNTKScaling``, ``Llama3Scaling``,
            ``LongRoPEScaling``) or None; excludes ``interpolation_factor``/``ntk_factor``.
            Its θ'_i replace θ_i; its ``attention_scaling()`` multiplies the rotated channels
            of q and k (cos/sin, as HF). Schemes with ``uses_length`` take the current length
            from the positions of each call (max + 1; one host sync).

    No parameters or buffers, nothing in the state dict; the per-frequency phase tables
    (θ_i/(2π s) in the form the exact int64 reduction needs, fp64 ``(3, width)``) are cached per
    (width, base', s, device) in a dict of ``functional.rotary_theta`` (the options are
    read-only, so the cache is never stale; with a ``scaling``, per (θ'_i, device), bounded).
    cos/sin come from the positions at each call (no length-limited table, no host sync but
    for the length-dependent scalings), computed once for q and k when they share positions,
    and are cast to the input dtype when applied.

    Example:
        >>> import torch
        >>> from transformer_zoo import RotaryEmbedding, RotaryLayout
        >>> rope = RotaryEmbedding(head_dim=16, layout=RotaryLayout.HALF_SPLIT)
        >>> q = k = torch.randn(2, 4, 10, 16)
        >>> pos = torch.arange(10)
        >>> rq, rk = rope(q, k, pos, pos)
        >>> rq.shape
        torch.Size([2, 4, 10, 16])
    """

    def __init__(
        self,
        *,
        head_dim: int,
        rotary_dim: int | None = None,
        base: float = 10000.0,
        layout: RotaryLayout = RotaryLayout.INTERLEAVED,
        interpolation_factor: float = 1.0,
        ntk_factor: float = 1.0,
        scaling: RopeScaling | None = None,
    ) -> None:
        super().__init__()
        rotary_dim = check_rotary_sizes(head_dim, rotary_dim, base)
        self._head_dim = head_dim
        self._rotary_dim = rotary_dim
        self._base = float(base)
        self._layout = _check_layout(layout)
        self._interpolation_factor = _check_factor(interpolation_factor, "interpolation_factor")
        self._ntk_factor = _check_factor(ntk_factor, "ntk_factor")
        # base' after NTK rescaling; every width (rotary_dim or a Performer's dim) uses it.
        self._scaled_base = ntk_scaled_base(self._base, rotary_dim, self._ntk_factor)
        if scaling is not None and not isinstance(scaling, RopeScaling):
            raise TypeError(
                "scaling: expected a RopeScaling (YaRNScaling, DynamicNTKScaling, "
                f"Llama3Scaling, LongRoPEScaling) or None, got {scaling!r}"
            )
        if scaling is not None and (self._interpolation_factor != 1 or self._ntk_factor != 1):
            raise ValueError(
                f"scaling={type(scaling).__name__}: expected interpolation_factor=1 and "
                f"ntk_factor=1 with it, got {interpolation_factor!r} and {ntk_factor!r}"
            )
        if scaling is not None:
            scaling.check_dim(rotary_dim)
        self._scaling = scaling
        self._attention_scaling = 1.0 if scaling is None else scaling.attention_scaling()
        self._static = (None if scaling is None or scaling.uses_length
                        else scaling.frequencies(rotary_dim, self._base, None))

    # read-only options: changing one would leave cached frequencies stale
    head_dim = property(lambda self: self._head_dim)
    rotary_dim = property(lambda self: self._rotary_dim)
    base = property(lambda self: self._base)
    layout = property(lambda self: self._layout)
    interpolation_factor = property(lambda self: self._interpolation_factor)
    ntk_factor = property(lambda self: self._ntk_factor)
    scaling = property(lambda self: self._scaling)
    #: the factor on cos/sin of the rotated channels (1 without a scaling that has one)
    attention_scaling = property(lambda self: self._attention_scaling)

    @classmethod
    def from_hf_config(
        cls,
        config: object,
        *,
        head_dim: int | None = None,
        max_position_embeddings: int | None = None,
        layout: RotaryLayout = RotaryLayout.HALF_SPLIT,
    ) -> RotaryEmbedding:
        """Build from a transformers config, a config dict, or a bare ``rope_parameters`` /
        ``rope_scaling`` dict (``rope_type``/``type``, ``rope_theta``, ``factor``, ...); see
        ``positional.rope_hf.rotary_kwargs_from_hf``. Unknown rope types or keys raise
        ValueError. ``layout`` defaults to HF's half-split (``rotate_half``)."""
        from transformer_zoo.positional.rope_hf import rotary_kwargs_from_hf

        return cls(**rotary_kwargs_from_hf(config, head_dim=head_dim,
                                           max_position_embeddings=max_position_embeddings),
                   layout=layout)

    def _check_dim_argument(self, dim: int | None) -> None:
        if self._scaling is None or dim is None:
            return
        if dim != self._rotary_dim or self._attention_scaling != 1.0:
            raise ValueError(
                f"dim={dim}: scaling={type(self._scaling).__name__} is defined for the "
                f"rotary_dim={self._rotary_dim} channels of q and k (its θ'_i are per "
                "dimension, and its attention factor on numerator-only features would not "
                "cancel); rotate other widths (Performer RotaryMode.NUMERATOR) with an "
                "unscaled RotaryEmbedding, or use RotaryMode.QUERY_KEY"
            )

    def _frequencies_at(self, seq_len: int | None) -> tuple[tuple[float, ...], ...]:
        if self._static is not None:
            return self._static
        return self._scaling.frequencies(self._rotary_dim, self._base, seq_len)

    def frequencies(
        self, dim: int, device: torch.device, *, seq_len: int | None = None
    ) -> Tensor:
        """θ_i = base'^(−2i/dim) (with ``scaling``: its θ'_i at ``seq_len``), fp64
        ``(dim/2,)`` on ``device`` (fp32 on MPS)."""
        if self._scaling is None:
            return rotary_frequencies(dim, base=self._scaled_base, device=device)
        if dim != self._rotary_dim:
            raise ValueError(f"dim: scaling={type(self._scaling).__name__} is defined for "
                             f"rotary_dim={self._rotary_dim} only, got {dim}")
        wide = torch.float32 if torch.device(device).type == "mps" else torch.float64
        return torch.tensor(self._frequencies_at(seq_len)[0], dtype=wide, device=device)

    def angles(
        self, positions: Tensor, dim: int | None = None, *, seq_len: int | None = None
    ) -> Tensor:
        """Angles (p/s)·θ_i mod 2π (fp32) ``(n, dim/2)`` or ``(b, 1, n, dim/2)``, exact for
        every int64 position, then rounded once to fp32. With a length-dependent ``scaling``
        the length is ``seq_len``, by default max(positions) + 1."""
        if self._scaling is not None:
            if dim is not None and dim != self._rotary_dim:
                self._check_dim_argument(dim)  # raises: θ'_i exist for rotary_dim only
            if self._scaling.uses_length and seq_len is None:
                seq_len = _length(positions)
            return exact_angles_for_frequencies(positions, self._frequencies_at(seq_len))
        dim = self._rotary_dim if dim is None else _check_even_dim(dim)
        return exact_rotary_angles(positions, dim, self._scaled_base, self._interpolation_factor)

    def rotate(
        self, x: Tensor, positions: Tensor, *, dim: int | None = None,
        seq_len: int | None = None,
    ) -> Tensor:
        """Rotate x ``(b, h, n, w)`` by int64 positions ``(n,)`` or ``(b, n)`` (times
        ``attention_scaling`` on the rotated channels).

        ``dim=None``: the first ``rotary_dim`` channels with this module's frequencies (w must
        be ``head_dim``). ``dim`` given (even, <= w): the first ``dim`` channels with
        θ_i = base'^(−2i/dim) — used to rotate Performer random features φ(q), φ(k) in the
        numerator only (RoFormer eq. 19); refused (ValueError) with a ``scaling``, except
        dim = rotary_dim without attention factor. ``seq_len``: see ``angles``.
        """
        self._check_dim_argument(dim)
        width = self._rotary_dim if dim is None else _check_even_dim(dim)
        check_rotary_input(x, positions, width)
        if dim is None and x.shape[-1] != self._head_dim:
            raise ValueError(
                f"x: expected head_dim={self._head_dim} channels, got shape {tuple(x.shape)}"
            )
        return apply_rotary_angles(x, self.angles(positions, dim, seq_len=seq_len),
                                   layout=self._layout, scale=self._attention_scaling)

    def forward(
        self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(rotate(q, q_positions), rotate(k, k_positions))``; angles shared when the two
        position tensors are the same object (self-attention)."""
        seq_len = None
        if self._scaling is not None and self._scaling.uses_length:
            # one length for q and k: max over both (the HF case: the same positions)
            seq_len = max(_length(q_positions), _length(k_positions))
        if k_positions is not q_positions:
            return (self.rotate(q, q_positions, seq_len=seq_len),
                    self.rotate(k, k_positions, seq_len=seq_len))
        check_rotary_input(q, q_positions, self._rotary_dim)
        check_rotary_input(k, k_positions, self._rotary_dim)
        for name, t in (("q", q), ("k", k)):
            if t.shape[-1] != self._head_dim:
                raise ValueError(
                    f"{name}: expected head_dim={self._head_dim} channels, got shape "
                    f"{tuple(t.shape)}"
                )
        angles = self.angles(q_positions, seq_len=seq_len)
        scale = self._attention_scaling
        if torch.compiler.is_compiling() or q.dtype != k.dtype:
            return (
                apply_rotary_angles(q, angles, layout=self._layout, scale=scale),
                apply_rotary_angles(k, angles, layout=self._layout, scale=scale),
            )
        tables = rotary_tables(angles, q.dtype, self._layout, scale)  # once for q and k
        return (
            apply_rotary_tables(q, tables, layout=self._layout),
            apply_rotary_tables(k, tables, layout=self._layout),
        )

    def extra_repr(self) -> str:
        return (
            f"head_dim={self._head_dim}, rotary_dim={self._rotary_dim}, base={self._base:g}, "
            f"layout={self._layout.name}, interpolation_factor={self._interpolation_factor:g}, "
            f"ntk_factor={self._ntk_factor:g}"
            + ("" if self._scaling is None else f", scaling={self._scaling!r}")
        )


def _length(positions: Tensor) -> int:
    """The current length max(positions) + 1 (a host sync), 0 for no positions."""
    return int(positions.max()) + 1 if positions.numel() else 0
