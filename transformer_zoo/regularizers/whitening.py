"""BERT-whitening: map embeddings to zero mean and identity covariance, optionally truncated.

    μ = mean(X),  Σ = cov(X) = U Λ Uᵀ,  W = U Λ^(−½),  y = (x − μ) W[:, :k]

Su, Cao, Liu and Ou 2021, "Whitening Sentence Representations for Better Semantics and Faster
Retrieval", arXiv 2103.15316 (seeded by Su's post "You may not need BERT-flow"). Sentence
embeddings of pretrained encoders are anisotropic (all pairwise cosines high); whitening makes
cosine similarity meaningful again, and keeping the k leading directions shrinks the vectors.

Statistics are taken from centred data, in fp64. Each chunk of m rows gets its mean μ_c and
its population covariance Σ_c = (x − μ_c)ᵀ(x − μ_c)/m by the corrected two-pass formula; the
running ones (n rows so far) are merged by Chan, Golub and LeVeque's (1979) pairwise update
(Welford's for m = 1), δ = μ_c − μ:

    μ' = μ + δ m / (n + m)
    Σ' = (n Σ + m Σ_c) / (n + m) + δ δᵀ n m / (n + m)²

So ``partial_fit`` over chunks equals ``fit`` on their concatenation, corpora larger than
memory work, and a mean far from 0 costs nothing: the post's recurrence (and any
E[xxᵀ] − μμᵀ form) subtracts two numbers of size |μ|², so at |μ| = 10^5 with unit spread it
loses 10 of fp64's 16 digits (cov(y) − I ~ 1e-5 to 1e-2); centred, ``fit`` keeps cov(y) − I
~1e-15, and streaming adds only the rounding of the fp64 running mean at each merge (≤ 1e-10
at |μ| = 10^6).

ddof: Σ is divided by n − ddof; the default ddof = 1 matches the paper's code (``np.cov``) and
``torch.cov``, so on the fitted set ``torch.cov(y)`` is exactly I_k. ddof only rescales y by
√((n − ddof)/n); cosine similarities do not depend on it.

Exact up to rounding when the kept eigenvalues are well above 0: fp64 data is whitened to fp64
accuracy, fp32 data to fp32 (outputs are in the input dtype). Σ has rank ≤ n − 1:
with fewer samples than dimensions keep ``n_components`` below that rank; eigenvalues under
``eps · λ_max`` are clamped there (those directions are noise). Eigenvector signs are fixed
(largest-magnitude entry positive) so refits give the same kernel.

State: buffers ``kernel`` ``(d, k)`` = W[:, :k] and ``bias`` ``(d,)`` = −μ (the paper code's
names: y = (x + bias) @ kernel), plus the fp64 running statistics ``count``, ``running_mean``,
``running_cov`` (population covariance); all are in ``state_dict`` (an unfitted module loads any
d, and checkpoints of earlier versions, which hold the same five buffers, load unchanged).
kernel and bias are kept in the wider of their dtype and the data's (fp32 by default, fp64 once
fp64 data is fitted or loaded). ``.half()`` or ``.to(dtype)`` casts the fp64 statistics too: to
keep streaming in full precision, cast after the last ``partial_fit``. forward centres x in
the wider of its dtype and the bias's, then multiplies in the dtype of x.

Shapes: fit/partial_fit ``(N, d)``; forward ``(..., d) -> (..., k)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from transformer_zoo._checks import check_floating, check_positive_int, check_rank, check_tensor
from transformer_zoo._scripting import refuse_scripting

_STATE = ("kernel", "bias", "count", "running_mean", "running_cov")


class Whitening(nn.Module):
    """Whitening transform fitted on a set of embeddings; forward applies it.

    Args:
        n_components: k, the number of leading directions kept (None: all d).
        ddof: delta degrees of freedom of the covariance (0 or 1 usually; default 1).
        eps: eigenvalues below ``eps · λ_max`` are clamped to it.
    """

    __prepare_scriptable__ = refuse_scripting  # TorchScript unsupported: raise, name export

    kernel: Tensor
    bias: Tensor
    count: Tensor
    running_mean: Tensor
    running_cov: Tensor

    def __init__(
        self, *, n_components: int | None = None, ddof: int = 1, eps: float = 1e-12
    ) -> None:
        super().__init__()
        if n_components is not None:
            check_positive_int(n_components, "n_components")
        if isinstance(ddof, bool) or not isinstance(ddof, int):
            raise TypeError(f"ddof: expected an int, got {type(ddof).__name__}")
        if ddof < 0:
            raise ValueError(f"ddof: expected an int >= 0, got {ddof}")
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps: expected a float in (0, 1), got {eps}")
        self.n_components = n_components
        self.ddof = ddof
        self.eps = float(eps)
        self.register_buffer("kernel", torch.empty(0, 0))
        self.register_buffer("bias", torch.empty(0))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("running_mean", torch.empty(0, dtype=torch.float64))
        self.register_buffer("running_cov", torch.empty(0, 0, dtype=torch.float64))

    @property
    def fitted(self) -> bool:
        return self.kernel.numel() > 0

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.kernel = self.kernel.new_empty(0, 0)
        self.bias = self.bias.new_empty(0)
        self.count = torch.zeros_like(self.count)
        self.running_mean = self.running_mean.new_empty(0).double()
        self.running_cov = self.running_cov.new_empty(0, 0).double()

    def fit(self, x: Tensor) -> Whitening:
        """Fit on ``x`` ``(N, d)`` from scratch; returns self."""
        self.reset()
        return self.partial_fit(x)

    @torch.no_grad()
    def partial_fit(self, x: Tensor) -> Whitening:
        """Fold the rows of ``x`` ``(m, d)`` into the running statistics; returns self."""
        check_rank(x, "x", 2, "(samples, dim)")
        check_floating(x, "x")
        m, d = x.shape
        if m == 0:
            raise ValueError("x: expected at least one row, got shape (0, d)")
        n = int(self.count)
        if n and d != self.running_mean.shape[0]:
            raise ValueError(
                f"x: expected dim {self.running_mean.shape[0]} as in earlier chunks, got {d}"
            )
        if self.n_components is not None and self.n_components > d:
            raise ValueError(f"n_components: expected at most dim = {d}, got {self.n_components}")
        dtype = torch.promote_types(self.kernel.dtype, x.dtype)  # kernel/bias precision
        self.kernel, self.bias = self.kernel.to(dtype), self.bias.to(dtype)
        x = x.to(device=self.running_mean.device, dtype=torch.float64)
        mean_c = x.mean(0)  # (d,)
        centred = x - mean_c  # (m, d)
        residual = centred.mean(0)  # rounding left in mean_c; the corrected two-pass term
        cov_c = centred.mT @ centred / m - torch.outer(residual, residual)  # (d, d)
        if n == 0:
            mean, cov = mean_c, cov_c
        else:  # Chan-Golub-LeVeque pairwise merge of (n, μ, Σ) and (m, μ_c, Σ_c)
            mu, prev = self.running_mean.double(), self.running_cov.double()
            delta = mean_c - mu
            mean = mu + delta * (m / (n + m))
            spread = torch.outer(delta, delta) * (n * m / (n + m) ** 2)
            cov = (n * prev + m * cov_c) / (n + m) + spread
        self.running_mean, self.running_cov = mean, 0.5 * (cov + cov.mT)
        self.count = torch.full_like(self.count, n + m)
        if n + m > self.ddof:
            self._update_kernel()
        return self

    def _update_kernel(self) -> None:
        n = int(self.count)
        cov = self.running_cov * (n / (n - self.ddof))  # (d, d)
        d = cov.shape[0]
        k = d if self.n_components is None else self.n_components
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals, evecs = evals.flip(-1)[:k], evecs.flip(-1)[:, :k]  # (k,), (d, k) descending
        top = evals[0].clamp_min(torch.finfo(torch.float64).tiny)
        evals = evals.clamp_min(self.eps * top)
        rows = evecs.abs().argmax(0)  # fix signs: largest entry of each column positive
        evecs = evecs * evecs[rows, torch.arange(k, device=evecs.device)].sign()
        kernel = evecs * evals.rsqrt()  # (d, k) = U Λ^(-1/2)
        # contiguous: eigh returns column-major vectors; a checkpoint loaded into a fresh
        # module is contiguous, and both must multiply bit-identically
        self.kernel = kernel.to(self.kernel.dtype).contiguous()
        self.bias = (-self.running_mean).to(self.bias.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., d) -> (..., k)``: y = (x − μ) W[:, :k], in the dtype of ``x``."""
        check_tensor(x, "x")
        check_floating(x, "x")
        if not self.fitted:
            raise RuntimeError(
                f"Whitening: call fit or partial_fit first (needs more than ddof = {self.ddof} "
                f"samples, has {int(self.count)})"
            )
        d = self.kernel.shape[0]
        if x.ndim < 1 or x.shape[-1] != d:
            raise ValueError(f"x: expected shape (..., {d}), got {tuple(x.shape)}")
        wide = torch.promote_types(x.dtype, self.bias.dtype)  # centre before rounding to x's
        centred = (x.to(wide) + self.bias.to(wide)).to(x.dtype)
        return centred @ self.kernel.to(x.dtype)  # (..., k)

    def transform(self, x: Tensor) -> Tensor:
        """Alias of ``forward`` (the scikit-learn name)."""
        return self(x)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # Buffers take the shapes of the saved ones, so an unfitted module loads any d and k,
        # as long as k agrees with this module's n_components.
        saved = state_dict.get(prefix + "kernel")
        if (
            isinstance(saved, Tensor) and saved.numel() and self.n_components is not None
            and saved.shape[1] != self.n_components
        ):
            error_msgs = args[4] if len(args) > 4 else kwargs["error_msgs"]
            error_msgs.append(
                f"size mismatch for {prefix}kernel: copying a param with shape "
                f"{tuple(saved.shape)} from checkpoint, but this module has "
                f"n_components={self.n_components} (expected (d, {self.n_components}))"
            )
            return
        for name in _STATE:
            saved, mine = state_dict.get(prefix + name), getattr(self, name)
            if not isinstance(saved, Tensor):
                continue
            dtype = mine.dtype  # kernel and bias keep the checkpoint's precision if wider
            if name in ("kernel", "bias") and saved.is_floating_point():
                dtype = torch.promote_types(dtype, saved.dtype)
            if saved.shape != mine.shape or dtype != mine.dtype:
                setattr(self, name, mine.new_empty(saved.shape, dtype=dtype))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        dims = f", dim={self.kernel.shape[0]}, k={self.kernel.shape[1]}" if self.fitted else ""
        return f"n_components={self.n_components}, ddof={self.ddof}{dims}"
