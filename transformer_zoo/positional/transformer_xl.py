"""Transformer-XL relative positional attention: a logit bias that reads queries and keys.

    A^rel_ij = q_iᵀk_j + q_iᵀ W_R R_{i−j} + uᵀ k_j + vᵀ W_R R_{i−j},   all · 1/√d
                 (a)         (b)            (c)         (d)

Dai, Yang, Yang, Carbonell, Le, Salakhutdinov 2019, "Transformer-XL: Attentive Language
Models Beyond a Fixed-Length Context", arXiv 1901.02860, section 3.3 (XLNet, arXiv
1906.08237, uses the same form). R_r is the sinusoid of the relative distance r = i − j
(query position minus key position; no learned table), D = d_model wide; W_R = W_{k,R}
(learned, one per layer) maps it to every head; u, v ∈ R^(h × d) are learned per head and
shared by all layers in the paper (``share_biases_with``, or ``sharing_factory`` for the
encoder). Term (a) is
the attention kernel's own q·k/√d; this encoding returns (b) + (c) + (d).

Causal (the paper's language model: keys j ≤ i, distances ≥ 0) and bidirectional (negative
distances are the same sinusoid) alike: the attention's ``causal`` decides which keys are
seen. Keys from a memory (m ≥ n, with the positions of memory and segment given) work as
cross lengths. Exact: equal to the paper's formula and to the reference code's
``RelPartialLearnableMultiHeadAttn`` (AC + BD with ``_rel_shift``) to fp64 rounding.

Shapes: b batch, h heads, n query length, m key length, d head dim, D d_model (sinusoid
width). q ``(b, h, n, d)``, k ``(b, h, m, d)``; positions int64 ``(n,)``/``(b, n)`` and
``(m,)``/``(b, m)``; bias ``(b, h, n, m)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from transformer_zoo._checks import check_positive_int, check_rank
from transformer_zoo.functional.transformer_xl import transformer_xl_bias, transformer_xl_bias_rows
from transformer_zoo.functional.transformer_xl_blockwise import transformer_xl_skewed_rows
from transformer_zoo.positional.base import LogitBias


class TransformerXLRelativePosition(LogitBias):
    """Transformer-XL's relative terms (b), (c), (d) with sinusoidal R, learned W_R, u, v.

    Args:
        d_model: width D of the sinusoid R (the paper's d_model; must be even).
        n_heads: number of heads h.
        head_dim: per-head width d of q and k.
        share_biases_with: another ``TransformerXLRelativePosition`` whose u, v this one uses
            (the paper shares them across layers). This encoding then holds only its W_R: u
            and v are parameters of the owner alone (once in a model's ``parameters()`` and
            ``state_dict``), so the owner must be part of the same model.
        clamp_len: clip distances to [−clamp_len, clamp_len] (the reference code's
            ``clamp_len``, for evaluation beyond the training lengths); None: no clipping.
        base: the sinusoid's 10000.
        init_std: std of the normal initialisation of W_R, u and v (0.02, as the reference).

    Example:
        >>> import torch
        >>> from transformer_zoo import SoftmaxAttention, TransformerXLRelativePosition
        >>> pe = TransformerXLRelativePosition(d_model=32, n_heads=4, head_dim=8)
        >>> attn = SoftmaxAttention(32, 4, causal=True, positional=pe)
        >>> attn(torch.randn(2, 5, 32)).shape
        torch.Size([2, 5, 32])
    """

    needs_keys = True

    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        head_dim: int,
        share_biases_with: TransformerXLRelativePosition | None = None,
        clamp_len: int | None = None,
        base: float = 10000.0,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.d_model = check_positive_int(d_model, "d_model")
        if d_model % 2:
            raise ValueError(f"d_model: the sinusoid R needs an even width, got {d_model}")
        self.n_heads = check_positive_int(n_heads, "n_heads")
        self.head_dim = check_positive_int(head_dim, "head_dim")
        self.clamp_len = None if clamp_len is None else check_positive_int(clamp_len,
                                                                           "clamp_len")
        if isinstance(base, bool) or not isinstance(base, (int, float)) or base <= 1:
            raise ValueError(f"base: expected a number > 1, got {base!r}")
        self.base = float(base)
        self.init_std = float(init_std)
        self.r_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)  # W_{k,R}
        if share_biases_with is None:
            self.u = nn.Parameter(torch.empty(n_heads, head_dim))  # global content bias
            self.v = nn.Parameter(torch.empty(n_heads, head_dim))  # global position bias
            owner = None
        else:
            if not isinstance(share_biases_with, TransformerXLRelativePosition):
                raise TypeError(
                    "share_biases_with: expected a TransformerXLRelativePosition, got "
                    f"{type(share_biases_with).__name__}"
                )
            owner = share_biases_with.bias_owner
            if (owner.n_heads, owner.head_dim) != (n_heads, head_dim):
                raise ValueError(
                    f"share_biases_with: its u, v are ({owner.n_heads}, {owner.head_dim}); "
                    f"expected (n_heads={n_heads}, head_dim={head_dim})"
                )
        # A plain reference, not a submodule: u and v stay parameters of their owner only.
        object.__setattr__(self, "_bias_owner", owner)
        self.reset_parameters()

    @property
    def bias_owner(self) -> TransformerXLRelativePosition:
        """The encoding holding this one's u and v (itself unless it shares them)."""
        return self if self._bias_owner is None else self._bias_owner

    @property
    def shares_biases(self) -> bool:
        return self._bias_owner is not None

    def reset_parameters(self) -> None:
        nn.init.normal_(self.r_proj.weight, std=self.init_std)
        if not self.shares_biases:
            nn.init.normal_(self.u, std=self.init_std)
            nn.init.normal_(self.v, std=self.init_std)

    @classmethod
    def sharing_factory(
        cls,
        *,
        n_layers: int,
        d_model: int,
        n_heads: int,
        head_dim: int,
        clamp_len: int | None = None,
        base: float = 10000.0,
        init_std: float = 0.02,
    ) -> Callable[[], TransformerXLRelativePosition]:
        """A zero-argument factory for ``EncoderConfig.positional``, as in the paper: every
        layer its own W_R, one u and v for all. The encoder calls it once per layer; calls
        1, n_layers + 1, 2·n_layers + 1, … build an encoding that owns u and v (each model's
        first layer), the others one that shares the latest owner's. So every model built
        from the factory (a config reused for a twin, a checkpoint reload) gets its own u, v;
        ``n_layers`` must be the encoder's."""
        n_layers = check_positive_int(n_layers, "n_layers")
        options = dict(d_model=d_model, n_heads=n_heads, head_dim=head_dim,
                       clamp_len=clamp_len, base=base, init_std=init_std)
        built: list[TransformerXLRelativePosition] = []  # [owner of the current group]
        calls = [0]

        def make() -> TransformerXLRelativePosition:
            first = calls[0] % n_layers == 0
            calls[0] += 1
            if first:
                built[:] = [cls(**options)]
                return built[0]
            return cls(**options, share_biases_with=built[0])

        return make

    def check_attention(self, *, n_heads: int, causal: bool) -> None:
        if n_heads != self.n_heads:
            raise ValueError(
                f"TransformerXLRelativePosition(n_heads={self.n_heads}) cannot serve an "
                f"attention with n_heads={n_heads}: expected equal head counts (u, v and W_R "
                "are per head)"
            )

    def forward(
        self, q: Tensor, q_positions: Tensor, k_positions: Tensor, *, k: Tensor
    ) -> Tensor:
        check_rank(q, "q", 4, "(batch, heads, seq, head_dim)")
        if q.shape[1] != self.n_heads or q.shape[-1] != self.head_dim:
            raise ValueError(
                f"q: expected (batch, n_heads={self.n_heads}, seq, head_dim={self.head_dim}), "
                f"got shape {tuple(q.shape)}"
            )
        owner = self.bias_owner
        return transformer_xl_bias(
            q, k, u=owner.u, v=owner.v, r_weight=self.r_proj.weight, q_positions=q_positions,
            k_positions=k_positions, clamp_len=self.clamp_len, base=self.base,
            scale=self.logit_scale(self.head_dim),
        )

    def bias_rows(
        self, q: Tensor, q_positions: Tensor, k_positions: Tensor, *, k: Tensor | None = None
    ) -> Callable[[int, int], Tensor]:
        """Rows of the bias for the blockwise kernels, with the W_R R table of the call's
        distances and uᵀk computed once: for positions that step by one the skewed rows
        (``functional.transformer_xl_blockwise``: a strided view instead of a gather, the
        gradients summed per call), else ``functional.transformer_xl_bias_rows``; positions
        with gaps fall back to ``forward`` per block."""
        if k is not None and q.ndim == 4 and q.shape[1] == self.n_heads and (
                q.shape[-1] == self.head_dim):
            owner = self.bias_owner
            options = dict(u=owner.u, v=owner.v, r_weight=self.r_proj.weight,
                           q_positions=q_positions, k_positions=k_positions,
                           clamp_len=self.clamp_len, base=self.base,
                           scale=self.logit_scale(self.head_dim))
            rows = transformer_xl_skewed_rows(q, k, **options) or transformer_xl_bias_rows(
                q, k, **options)
            if rows is not None:
                return rows
        return super().bias_rows(q, q_positions, k_positions, k=k)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, head_dim={self.head_dim}"
            + (f", clamp_len={self.clamp_len}" if self.clamp_len is not None else "")
            + (", biases shared" if self.shares_biases else "")
        )
