"""Performer attention (FAVOR+) as a multi-head module, with deterministic redraws.

    head_i ≈ D⁻¹ φ(Q̂_i) (φ(K̂_i)ᵀ V_i),  D = diag(φ(Q̂_i) φ(K̂_i)ᵀ 1),  x̂ = d^(−1/4) x,
    φ(x̂) = r^(−1/2) exp(W x̂ − |x̂|²/2)   (W: r orthogonal random rows, chi(d) norms)

Choromanski et al. 2021, "Rethinking Attention with Performers", arXiv 2009.14794. Linear in
the sequence length; an unbiased estimate of softmax attention (MSE ~ 1/r). Kernel and
stabilizers: ``transformer_zoo.functional.favor``. Shapes: x ``(b, n, d_model)`` ->
``(b, n, d_model)``; inside, q/k/v ``(b, h, n|m, d)`` and W ``(r, d)``.
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from transformer_zoo._checks import (
    check_floating,
    check_positive_int,
    check_same_device,
    check_tensor,
)
from transformer_zoo.attention.multihead import MultiHeadAttention
from transformer_zoo.functional.favor import NumeratorTransform, favor_attention
from transformer_zoo.functional.favor_decode import (
    FavorState,
    favor_decode_step,
    performer_attend_cached,
)
from transformer_zoo.functional.feature_maps import FeatureMap, PositiveFeatures
from transformer_zoo.functional.feature_maps_optimal import OptimalPositiveFeatures
from transformer_zoo.functional.random_features import RowNorms, draw_projection
from transformer_zoo.positional.base import Place, PositionalEncoding, QKTransform


class RotaryMode(enum.Enum):
    """How a rotary (``QKTransform``) encoding enters FAVOR+."""

    QUERY_KEY = "query_key"  # rotate q, k, then take features (the usual form)
    NUMERATOR = "numerator"  # rotate φ(q), φ(k) in the numerator only (RoFormer eq. 19)


class PerformerAttention(MultiHeadAttention):
    """FAVOR+ attention; core arguments as ``MultiHeadAttention``, plus (keyword-only):

    Args:
        nb_features: r, rows of the random matrix W (``HyperbolicFeatures`` gives 2r features).
        feature_map: a ``FeatureMap`` instance: ``PositiveFeatures()`` (default),
            ``HyperbolicFeatures()``, ``OptimalPositiveFeatures()`` (FAVOR++, lowest
            variance; causal needs a fixed ``rho``) or ``GeneralizedFeatures(fn)`` (ReLU);
            or a learnable map (``HedgehogFeatures()``, ``T2RFeatures()``,
            ``LearnedPositiveFeatures()``, ``attention/learned_feature_maps.py``). The map
            given is a spec: ``feature_map.build(n_heads=, head_dim=, projection=W)`` gives
            this layer's own (a learnable map: a fresh submodule ``feature_map`` with
            per-head parameters, in ``state_dict``), so one spec serves many layers.
        orthogonal: orthogonal blocks (True) or iid Gaussian rows.
        row_norms: ``RowNorms.CHI`` (independent chi(d) norms, unbiased) or ``RowNorms.SQRT_D``.
        redraw_interval: redraw W every this many training forward calls (None: never). W is
            never redrawn in eval mode.
        seed, layer: W for redraw step s is ``draw_projection(seed=seed, step=s, layer=layer)``:
            every data-parallel rank draws the same W with no communication. ``seed=None`` takes
            one from torch's global generator at construction (reproducible under
            ``torch.manual_seed``, different per layer).
        rotary: ``RotaryMode`` for a ``QKTransform`` encoding; ``NUMERATOR`` needs an encoding
            with ``rotate(x, positions, *, dim)``.
        chunk_size: rows per chunk of the causal prefix sum.

    Dropout (``dropout``) applies to the attention output per head (no weights are formed).
    ``attn_mask`` is not supported (use ``mask`` for padding and ``causal=True``).
    W (``projection``), the seed and the redraw counter are buffers: they round-trip through
    ``state_dict``. With a learnable map W is only the map's starting point
    (``LearnedPositiveFeatures``) or unused (Hedgehog, T2R), and it is never redrawn.
    ``step`` decodes one token at a time with O(F·d) state per head.

    Example:
        >>> import torch
        >>> from transformer_zoo import PerformerAttention
        >>> attn = PerformerAttention(64, 4, nb_features=32, causal=True, seed=0)
        >>> attn(torch.randn(2, 10, 64)).shape
        torch.Size([2, 10, 64])
    """

    accepts = frozenset({Place.INPUT, Place.QK})
    supports_causal = True

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        nb_features: int = 256,
        feature_map: FeatureMap | None = None,
        orthogonal: bool = True,
        row_norms: RowNorms = RowNorms.CHI,
        redraw_interval: int | None = None,
        seed: int | None = None,
        layer: int = 0,
        rotary: RotaryMode = RotaryMode.QUERY_KEY,
        chunk_size: int = 128,
        dropout: float = 0.0,
        bias: bool = True,
        causal: bool = False,
        positional: PositionalEncoding | None = None,
        kv_dim: int | None = None,
        head_dim: int | None = None,
    ) -> None:
        super().__init__(d_model, n_heads, dropout=dropout, bias=bias, causal=causal,
                         positional=positional, kv_dim=kv_dim, head_dim=head_dim)
        self.nb_features = check_positive_int(nb_features, "nb_features")
        feature_map = PositiveFeatures() if feature_map is None else feature_map
        if not isinstance(feature_map, FeatureMap):
            raise TypeError(
                "feature_map: expected a FeatureMap instance (PositiveFeatures(), "
                "HyperbolicFeatures(), OptimalPositiveFeatures(), GeneralizedFeatures(fn), "
                "or a learnable HedgehogFeatures(), T2RFeatures(), LearnedPositiveFeatures()), "
                f"got {feature_map!r}"
            )
        if causal and isinstance(feature_map, OptimalPositiveFeatures) and feature_map.rho is None:
            raise ValueError(
                "causal PerformerAttention with OptimalPositiveFeatures(rho=None): measuring rho "
                "reads every key, future ones included; pass a fixed rho, e.g. "
                "OptimalPositiveFeatures(rho=0.25)"
            )
        if not isinstance(rotary, RotaryMode):
            raise TypeError(f"rotary: expected a RotaryMode member, got {rotary!r}")
        if rotary is RotaryMode.NUMERATOR and not callable(getattr(positional, "rotate", None)):
            raise ValueError(
                "rotary=RotaryMode.NUMERATOR needs a positional encoding with a "
                "rotate(x, positions, *, dim) method (e.g. RotaryEmbedding), got "
                f"{type(positional).__name__}"
            )
        if redraw_interval is not None:
            check_positive_int(redraw_interval, "redraw_interval")
            if not feature_map.uses_projection:
                raise ValueError(
                    f"redraw_interval={redraw_interval} with {type(feature_map).__name__}: "
                    "this map trains its own parameters and never reads the random W, so a "
                    "redraw would change nothing; pass redraw_interval=None"
                )
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), device="cpu").item())  # also under meta
        self.orthogonal, self.row_norms = orthogonal, row_norms
        self.redraw_interval, self.layer, self.rotary = redraw_interval, layer, rotary
        self.chunk_size = check_positive_int(chunk_size, "chunk_size")
        self._init_seed = int(seed)
        self.register_buffer("seed", torch.tensor(int(seed), dtype=torch.int64))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.register_buffer("projection", self._draw(0))
        # this layer's own map (learnable maps: fresh per-head parameters, a submodule)
        self.feature_map = feature_map.build(n_heads=n_heads, head_dim=self.head_dim,
                                             projection=self.projection)
        if not isinstance(self.feature_map, FeatureMap):
            raise TypeError(
                f"{type(feature_map).__name__}.build returned "
                f"{type(self.feature_map).__name__}, expected a FeatureMap"
            )

    # -- random matrix --------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Back to redraw step 0 of this module's seed (e.g. after meta construction and
        ``to_empty``): seed, call counter and W are rebuilt."""
        self.seed.fill_(self._init_seed)
        self.calls.zero_()
        self.projection.copy_(self._draw(0))

    def _draw(self, step: int) -> Tensor:
        return draw_projection(
            self.nb_features, self.head_dim, step=step, layer=self.layer,
            seed=self._init_seed if self.seed.is_meta else int(self.seed),
            orthogonal=self.orthogonal, row_norms=self.row_norms,
        )

    @torch.no_grad()
    def redraw_projection(self, step: int) -> None:
        """Set W to the matrix of redraw ``step`` (deterministic in seed, step, layer)."""
        self.projection.copy_(self._draw(step))

    def _maybe_redraw(self) -> None:
        if not self.training or self.redraw_interval is None:
            return
        self._count_and_redraw()

    @torch.compiler.disable  # a data-dependent counter and a torch.Generator: runs eagerly
    def _count_and_redraw(self) -> None:
        calls = int(self.calls)
        if calls > 0 and calls % self.redraw_interval == 0:
            self.redraw_projection(calls // self.redraw_interval)
        self.calls += 1

    # -- rotary ---------------------------------------------------------------------------
    def _numerator_transform(self, q_pos: Tensor, k_pos: Tensor) -> NumeratorTransform | None:
        if self.rotary is not RotaryMode.NUMERATOR:
            return None
        pe = self.positional

        def rotate(qf: Tensor, kf: Tensor) -> tuple[Tensor, Tensor]:
            dim = qf.shape[-1] - qf.shape[-1] % 2  # an even number of feature channels
            return pe.rotate(qf, q_pos, dim=dim), pe.rotate(kf, k_pos, dim=dim)

        return rotate

    def _rotate_qk(self, q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor):
        if self.rotary is RotaryMode.QUERY_KEY and isinstance(self.positional, QKTransform):
            return self.rotate(q, k, q_pos, k_pos)
        return q, k

    # -- kernel ---------------------------------------------------------------------------
    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
        q_positions: Tensor,
        k_positions: Tensor,
        query_padding_mask: Tensor | None = None,
    ) -> Tensor:
        if attn_mask is not None:
            raise ValueError(
                "PerformerAttention does not take attn_mask (linear attention never forms "
                "the n × m weights); use mask= for key padding and causal=True"
            )
        self._maybe_redraw()
        q, k = self._rotate_qk(q, k, q_positions, k_positions)
        out = favor_attention(
            q, k, v, self.projection,
            feature_map=self.feature_map,
            causal=self.causal,
            key_padding_mask=key_padding_mask,
            numerator_transform=self._numerator_transform(q_positions, k_positions),
            chunk_size=self.chunk_size,
            query_padding_mask=query_padding_mask,
        )  # (b, h, n, d)
        p = self.attention_dropout()
        return F.dropout(out, p=p) if p > 0 else out

    def attend_cached(self, q, k, v, cache, *, key_padding_mask, q_positions, k_positions):
        """The recurrent ``FavorState`` (O(r·d) per head) instead of a KV cache."""
        return performer_attend_cached(self, q, k, v, cache, key_padding_mask=key_padding_mask,
                                       q_positions=q_positions, k_positions=k_positions)

    @torch.no_grad()
    def step(self, x: Tensor, state: FavorState | None = None) -> tuple[Tensor, FavorState]:
        """Decode one token: x ``(b, 1, d_model)`` -> ``(out (b, 1, d_model), state)``.

        Causal self-attention only; the token's position is ``state.length`` (0 first).
        Equal (to rounding) to the last row of ``forward`` on the whole prefix.
        """
        if not self.causal:
            raise ValueError("step() decodes causal attention; build with causal=True")
        check_tensor(x, "x")
        if x.ndim != 3 or x.shape[1] != 1 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x: expected (batch, 1, d_model={self.d_model}), got {tuple(x.shape)}"
            )
        check_floating(x, "x")
        check_same_device("x", x, "the parameters", self.q_proj.weight.device)
        if x.dtype != self.q_proj.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"x has dtype {x.dtype} but the parameters are {self.q_proj.weight.dtype}; "
                "cast one to the other (or use torch.autocast)"
            )
        if state is not None and not isinstance(state, FavorState):
            raise TypeError(f"state: expected a FavorState or None, got {type(state).__name__}")
        pos = torch.full((1,), 0 if state is None else state.length, device=x.device)
        q = rearrange(self.q_proj(x), "b n (h d) -> b h n d", h=self.n_heads)
        k, v = rearrange(self.kv_proj(x), "b m (two h d) -> two b h m d", two=2, h=self.n_heads)
        q, k = self._rotate_qk(q, k, pos, pos)
        out, state = favor_decode_step(
            q, k, v, self.projection, state, feature_map=self.feature_map,
            numerator_transform=self._numerator_transform(pos, pos),
        )
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)")), state

    def _map_repr(self) -> str:  # a learnable map prints as a child module
        fm = self.feature_map
        return type(fm).__name__ if isinstance(fm, torch.nn.Module) else repr(fm)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, nb_features={self.nb_features}, "
            f"feature_map={self._map_repr()}, redraw_interval={self.redraw_interval}, "
            f"layer={self.layer}, rotary={self.rotary.name}"
        )
