"""Random projection matrices for FAVOR+ (Performer), drawn deterministically.

    W = diag(s) [Q_1ᵀ; Q_2ᵀ; …]   (r × d),   Q_i R_i = G_i,  G_i ~ N(0, 1)^(d×d),
    Q_i ← Q_i · diag(sign(diag R_i)),   s_j ~ chi(d) independently   (or s_j = √d)

Choromanski et al. 2021, "Rethinking Attention with Performers", arXiv 2009.14794, section
2.4 (orthogonal random features). Shapes: r rows (random features), d head dim.

Exact facts the tests check:

- Each block of d rows is orthogonal (W_blk W_blkᵀ = diag(s²)); the last block is truncated.
- The sign fix makes each Q_i Haar-distributed, so every row w_j is an isotropic direction
  times a chi(d) norm, i.e. marginally N(0, I_d): E[exp(wᵀx)] = exp(|x|²/2) holds and the
  positive-feature estimator is unbiased. Without the fix (Google's code, performer-pytorch)
  the rows are biased towards particular directions and the estimator is ~5 % low on
  axis-aligned inputs.
- ``draw_projection(seed=…, step=…, layer=…)`` depends on those three integers only (a
  SHA-256 of them seeds a private CPU generator), so every data-parallel rank draws the same W
  with no communication, on any device.
"""

from __future__ import annotations

import enum
import hashlib
import math

import torch
from torch import Tensor

from transformer_zoo._checks import check_positive_int


class RowNorms(enum.Enum):
    """How the rows of W are scaled after orthogonalisation."""

    CHI = "chi"  # independent chi(d) norms: rows marginally N(0, I_d) (unbiased, the default)
    SQRT_D = "sqrt_d"  # every row has norm √d (the paper's "regularized" variant; biased)


def projection_seed(seed: int, step: int, layer: int) -> int:
    """A 63-bit generator seed that depends only on (seed, redraw step, layer index)."""
    for value, name in ((seed, "seed"), (step, "step"), (layer, "layer")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    digest = hashlib.sha256(f"favor+/{seed}/{step}/{layer}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def gaussian_orthogonal_matrix(
    nb_features: int,
    dim: int,
    *,
    orthogonal: bool = True,
    row_norms: RowNorms = RowNorms.CHI,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    draws: int | None = None,
) -> Tensor:
    """W ``(nb_features, dim)``: orthogonal blocks (or iid rows) with chi(d) or √d row norms.

    Drawn in float64 on the CPU (so the result does not depend on the device), returned in
    ``dtype``. ``orthogonal=False`` gives iid N(0, 1) rows (then ``row_norms`` is ignored:
    Gaussian rows already have chi(d) norms). ``draws=s`` returns ``s`` independent matrices
    ``(s, nb_features, dim)`` in one batched QR (Monte Carlo studies).
    """
    check_positive_int(nb_features, "nb_features")
    check_positive_int(dim, "dim")
    s = 1 if draws is None else check_positive_int(draws, "draws")
    if not isinstance(row_norms, RowNorms):
        raise TypeError(f"row_norms: expected a RowNorms member, got {row_norms!r}")
    # drawn where the generator lives (CPU without one), whatever torch's default device is:
    # the same numbers on every machine, and no CPU-generator/CUDA-tensor mismatch
    dev = generator.device if generator is not None else torch.device("cpu")
    opts = dict(generator=generator, dtype=torch.float64, device=dev)
    if not orthogonal:
        w = torch.randn(s, nb_features, dim, **opts)
    else:
        blocks = math.ceil(nb_features / dim)
        q, r = torch.linalg.qr(torch.randn(s, blocks, dim, dim, **opts))  # one batched QR
        sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))  # (s, blocks, d)
        q = q * sign.masked_fill(sign == 0, 1.0).unsqueeze(-2)  # Q diag(sign R_ii): Haar
        w = q.transpose(-2, -1).reshape(s, blocks * dim, dim)[:, :nb_features]  # rows of Qᵀ
        if row_norms is RowNorms.CHI:
            norms = torch.randn(s, nb_features, dim, **opts).norm(dim=-1)  # independent chi(d)
        else:
            norms = torch.full((s, nb_features), math.sqrt(dim), dtype=torch.float64, device=dev)
        w = norms.unsqueeze(-1) * w
    return (w if draws is not None else w[0]).to(dtype)


def draw_projection(
    nb_features: int,
    dim: int,
    *,
    seed: int,
    step: int = 0,
    layer: int = 0,
    orthogonal: bool = True,
    row_norms: RowNorms = RowNorms.CHI,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The W for (seed, redraw ``step``, ``layer``): identical on every process and device."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(projection_seed(seed, step, layer))
    return gaussian_orthogonal_matrix(
        nb_features, dim, orthogonal=orthogonal, row_norms=row_norms, generator=generator,
        dtype=dtype,
    )
