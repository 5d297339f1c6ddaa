"""Gaussian KL, Bhattacharyya and 2-Wasserstein: closed forms, references, symmetry, grads."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.distributions import MultivariateNormal, kl_divergence

from transformer_zoo.functional import gaussian_bhattacharyya, gaussian_kl, gaussian_wasserstein2

DIVERGENCES = (gaussian_kl, gaussian_bhattacharyya, gaussian_wasserstein2)


def random_spd(*shape: int, n: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(*shape, n, n, generator=g, dtype=torch.float64)
    return a @ a.mT / n + 0.1 * torch.eye(n, dtype=torch.float64)


def random_pair(batch: tuple[int, ...], n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    mu_p = torch.randn(*batch, n, generator=g, dtype=torch.float64)
    mu_q = torch.randn(*batch, n, generator=g, dtype=torch.float64)
    return mu_p, random_spd(*batch, n=n, g=g), mu_q, random_spd(*batch, n=n, g=g)


def sqrtm_sym(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def reference_w2_sq(mu_p, cov_p, mu_q, cov_q) -> float:
    """Slow reference: the textbook formula with explicit symmetric square roots (numpy)."""
    s = sqrtm_sym(cov_p)
    cross = np.trace(sqrtm_sym(s @ cov_q @ s))
    return float(((mu_p - mu_q) ** 2).sum() + np.trace(cov_p) + np.trace(cov_q) - 2 * cross)


def reference_bhattacharyya(mu_p, cov_p, mu_q, cov_q) -> float:
    """Slow reference with an explicit inverse and determinants (numpy)."""
    cov = (cov_p + cov_q) / 2
    diff = mu_q - mu_p
    maha = diff @ np.linalg.inv(cov) @ diff
    dets = np.linalg.det(cov), np.linalg.det(cov_p), np.linalg.det(cov_q)
    return float(maha / 8 + 0.5 * math.log(dets[0] / math.sqrt(dets[1] * dets[2])))


@pytest.mark.cpu_only
@given(st.integers(1, 5), st.integers(0, 2**16))
def test_against_references(n: int, seed: int) -> None:
    mu_p, cov_p, mu_q, cov_q = random_pair((3,), n, seed)
    kl = gaussian_kl(mu_p, cov_p, mu_q, cov_q)
    expected = kl_divergence(MultivariateNormal(mu_p, cov_p), MultivariateNormal(mu_q, cov_q))
    torch.testing.assert_close(kl, expected)
    b = gaussian_bhattacharyya(mu_p, cov_p, mu_q, cov_q)
    w2 = gaussian_wasserstein2(mu_p, cov_p, mu_q, cov_q)
    for i in range(3):
        args = [t[i].numpy() for t in (mu_p, cov_p, mu_q, cov_q)]
        assert b[i].item() == pytest.approx(reference_bhattacharyya(*args), rel=1e-9, abs=1e-12)
        assert w2[i].item() == pytest.approx(reference_w2_sq(*args), rel=1e-9, abs=1e-10)


@pytest.mark.cpu_only
@given(st.integers(1, 6), st.integers(0, 2**16))
def test_zero_for_identical_and_symmetry(n: int, seed: int) -> None:
    mu_p, cov_p, mu_q, cov_q = random_pair((4,), n, seed)
    for fn in DIVERGENCES:
        zero = fn(mu_p, cov_p, mu_p, cov_p)
        torch.testing.assert_close(zero, torch.zeros_like(zero), atol=1e-10, rtol=0)
        assert (fn(mu_p, cov_p, mu_q, cov_q) >= 0).all()
    for fn in (gaussian_bhattacharyya, gaussian_wasserstein2):
        torch.testing.assert_close(fn(mu_p, cov_p, mu_q, cov_q), fn(mu_q, cov_q, mu_p, cov_p))


def test_kl_is_not_symmetric() -> None:
    mu = torch.zeros(2, dtype=torch.float64)
    cov_p, cov_q = torch.eye(2, dtype=torch.float64), 4 * torch.eye(2, dtype=torch.float64)
    forward, backward = gaussian_kl(mu, cov_p, mu, cov_q), gaussian_kl(mu, cov_q, mu, cov_p)
    assert forward.item() == pytest.approx(2 * 0.5 * (0.25 - 1 + math.log(4)))
    assert backward.item() == pytest.approx(2 * 0.5 * (4 - 1 - math.log(4)))


@pytest.mark.cpu_only
@given(st.integers(1, 6), st.integers(0, 2**16))
def test_w2_with_commuting_covariances(n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = torch.rand(n, generator=g, dtype=torch.float64) * 3 + 0.1
    c = torch.rand(n, generator=g, dtype=torch.float64) * 3 + 0.1
    cov_p, cov_q = (u * a) @ u.T, (u * c) @ u.T  # share the eigenbasis u: they commute
    mu_p, mu_q = torch.randn(2, n, generator=g, dtype=torch.float64)
    root_p, root_q = (u * a.sqrt()) @ u.T, (u * c.sqrt()) @ u.T
    expected = (mu_p - mu_q).square().sum() + (root_p - root_q).square().sum()
    torch.testing.assert_close(gaussian_wasserstein2(mu_p, cov_p, mu_q, cov_q), expected)


@given(
    st.floats(-3, 3), st.floats(-3, 3), st.floats(0.1, 3), st.floats(0.1, 3),
)
def test_one_dimensional_closed_forms(m1: float, m2: float, s1: float, s2: float) -> None:
    mu_p, mu_q = torch.tensor([m1], dtype=torch.float64), torch.tensor([m2], dtype=torch.float64)
    cov_p = torch.tensor([[s1**2]], dtype=torch.float64)
    cov_q = torch.tensor([[s2**2]], dtype=torch.float64)
    kl = math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    b = (m1 - m2) ** 2 / (4 * (s1**2 + s2**2)) + 0.5 * math.log((s1**2 + s2**2) / (2 * s1 * s2))
    w2 = (m1 - m2) ** 2 + (s1 - s2) ** 2
    assert gaussian_kl(mu_p, cov_p, mu_q, cov_q).item() == pytest.approx(kl, abs=1e-12)
    assert gaussian_bhattacharyya(mu_p, cov_p, mu_q, cov_q).item() == pytest.approx(b, abs=1e-12)
    assert gaussian_wasserstein2(mu_p, cov_p, mu_q, cov_q).item() == pytest.approx(w2, abs=1e-12)
    root = gaussian_wasserstein2(mu_p, cov_p, mu_q, cov_q, squared=False).item()
    assert root == pytest.approx(math.sqrt(w2), abs=1e-6)


def test_bhattacharyya_is_minus_log_overlap_integral() -> None:
    x = torch.linspace(-20, 20, 200001, dtype=torch.float64)
    p = torch.exp(-0.5 * ((x - 0.3) / 0.7) ** 2) / (0.7 * math.sqrt(2 * math.pi))
    q = torch.exp(-0.5 * ((x + 1.1) / 1.9) ** 2) / (1.9 * math.sqrt(2 * math.pi))
    overlap = torch.trapezoid((p * q).sqrt(), x)
    one = torch.ones(1, 1, dtype=torch.float64)
    mu_p, mu_q = torch.tensor([0.3], dtype=torch.float64), torch.tensor([-1.1], dtype=torch.float64)
    got = gaussian_bhattacharyya(mu_p, 0.49 * one, mu_q, 3.61 * one)
    assert got.item() == pytest.approx(-math.log(overlap.item()), rel=1e-10)


@pytest.mark.cpu_only
def test_batch_broadcasting() -> None:
    g = torch.Generator().manual_seed(1)
    mu_p = torch.randn(4, 1, 3, generator=g, dtype=torch.float64)
    cov_p = random_spd(4, 1, n=3, g=g)
    mu_q = torch.randn(1, 5, 3, generator=g, dtype=torch.float64)
    cov_q = random_spd(5, n=3, g=g)  # batch (5,) broadcasts against (4, 1)
    for fn in DIVERGENCES:
        out = fn(mu_p, cov_p, mu_q, cov_q)
        assert out.shape == (4, 5)
        loop = fn(mu_p[2, 0], cov_p[2, 0], mu_q[0, 3], cov_q[3])
        torch.testing.assert_close(out[2, 3], loop)


@pytest.mark.cpu_only
def test_gradcheck_and_finite_gradients_at_repeated_eigenvalues() -> None:
    g = torch.Generator().manual_seed(7)
    inputs = [torch.randn(2, *s, generator=g, dtype=torch.float64) for s in ((3,), (3, 3)) * 2]
    inputs = tuple(t.requires_grad_() for t in inputs)
    eye = torch.eye(3, dtype=torch.float64)

    def spd(a: torch.Tensor) -> torch.Tensor:  # covariances through a symmetric map
        return a @ a.mT + 0.5 * eye

    for fn in DIVERGENCES:
        assert torch.autograd.gradcheck(
            lambda m_p, a_p, m_q, a_q, fn=fn: fn(m_p, spd(a_p), m_q, spd(a_q)), inputs
        )
    eye = torch.eye(4, dtype=torch.float64)
    cov_p = eye.clone().requires_grad_()  # Σ = I: every eigenvalue repeated
    cov_q = (2 * eye).requires_grad_()
    mu = torch.zeros(4, dtype=torch.float64)
    gaussian_wasserstein2(mu, cov_p, mu + 1, cov_q).backward()
    assert torch.isfinite(cov_p.grad).all() and torch.isfinite(cov_q.grad).all()
    # d W2² / d Σq at Σp = I, Σq = 2I is I − Σq^(-1/2) = (1 − 1/√2) I
    torch.testing.assert_close(cov_q.grad, (1 - 2**-0.5) * eye)


def test_w2_gradient_at_singular_cov_q_is_the_eps_limit() -> None:
    """Σp = I, Σq = diag(1, 0): W₂² = ‖Δμ‖² + 1 and a finite gradient, the ε → 0 limit of the
    gradient at Σq + εI, which converges like √ε (the eigenvalue 0 of C used to give NaN)."""
    d = torch.float64
    mu_p, mu_q = torch.zeros(2, dtype=d), torch.tensor([0.3, -0.4], dtype=d)

    def value_and_grads(eps: float):
        cov_p = torch.eye(2, dtype=d).requires_grad_()
        cov_q = (torch.diag(torch.tensor([1.0, 0.0], dtype=d)) + eps * torch.eye(2, dtype=d))
        cov_q.requires_grad_()
        w2 = gaussian_wasserstein2(mu_p, cov_p, mu_q, cov_q)
        w2.backward()
        return w2.detach(), cov_p.grad, cov_q.grad

    w2, grad_p, grad_q = value_and_grads(0.0)
    assert w2.item() == pytest.approx(0.25 + 1.0, abs=1e-15)
    assert torch.isfinite(grad_p).all() and torch.isfinite(grad_q).all()
    # dW₂²/dΣp = I − T with T = Σq^½ the transport map: diag(0, 1)
    torch.testing.assert_close(grad_p, torch.diag(torch.tensor([0.0, 1.0], dtype=d)))
    for eps in (1e-4, 1e-6, 1e-8):
        _, limit_p, limit_q = value_and_grads(eps)
        assert (limit_p - grad_p).abs().max().item() <= 2 * eps**0.5
        assert (limit_q - grad_q)[0].abs().max().item() <= 2 * eps**0.5  # row on range(Σq)
    # on null(Σq) × null(Σq) the gradient has no finite limit (−1/√ε): we give the finite part
    assert grad_q[1, 1].item() == 1.0


@pytest.mark.cpu_only
@pytest.mark.parametrize("seed", range(3))
def test_w2_gradients_through_a_low_rank_cov_q_converge_to_ours(seed: int) -> None:
    """Σq = XᵀX of rank 2 in 5-D (a sample covariance of 2 points): the gradients for Σp, the
    means, X, and the rows of the Σq-gradient on range(Σq) equal the limit ε → 0 at XᵀX + εI
    (which converges like √ε), and are finite."""
    d, n, rank = torch.float64, 5, 2
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=d)
    cov_p0 = a @ a.T / n + 0.2 * torch.eye(n, dtype=d)
    x0 = torch.randn(rank, n, generator=g, dtype=d)
    mu_p0, mu_q = torch.randn(2, n, generator=g, dtype=d)
    _, _, vh = torch.linalg.svd(x0)
    onto_range = vh[:rank].T @ vh[:rank]  # projector onto range(XᵀX)

    def grads(eps: float) -> list[torch.Tensor]:
        cov_p, x, mu_p = (t.clone().requires_grad_() for t in (cov_p0, x0, mu_p0))
        cov_q = x.T @ x + eps * torch.eye(n, dtype=d)
        cov_q.retain_grad()
        gaussian_wasserstein2(mu_p, cov_p, mu_q, cov_q).backward()
        return [cov_p.grad, x.grad, mu_p.grad, onto_range @ cov_q.grad]

    ours = grads(0.0)
    assert all(torch.isfinite(t).all() for t in ours)
    errors = []
    for eps in (1e-4, 1e-5, 1e-6, 1e-7, 1e-8):
        errs = [(lim - t).abs().max().item() for lim, t in zip(grads(eps), ours, strict=True)]
        assert max(errs) <= 5 * eps**0.5
        errors.append(max(errs))
    assert errors[-1] < errors[0] / 50  # √ε convergence over 4 decades: a factor of 100


def test_singular_covariances_kl_and_bhattacharyya_are_infinite_errors() -> None:
    """KL and Bhattacharyya with a singular covariance are +∞: a ValueError says so; W₂ with a
    singular Σp says to pass it as Σq (W₂ is symmetric)."""
    d = torch.float64
    mu, eye = torch.zeros(2, dtype=d), torch.eye(2, dtype=d)
    singular = torch.diag(torch.tensor([1.0, 0.0], dtype=d))
    for fn in (gaussian_kl, gaussian_bhattacharyya):
        for args in ((mu, eye, mu, singular), (mu, singular, mu, eye)):
            with pytest.raises(ValueError, match=r"positive definite.*\+∞"):
                fn(*args)
    with pytest.raises(ValueError, match="cov_p.*pass a singular covariance as cov_q"):
        gaussian_wasserstein2(mu, singular, mu, eye)
    swapped = gaussian_wasserstein2(mu, eye, mu, singular)
    assert swapped.item() == pytest.approx(1.0, abs=1e-15)  # ‖Σp^½ − Σq^½‖_F² = (1 − 0)²


def test_validation() -> None:
    mu, cov = torch.zeros(3), torch.eye(3)
    with pytest.raises(ValueError, match="positive definite"):
        gaussian_kl(mu, cov, mu, torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"cov_q: expected shape \(\.\.\., 3, 3\)"):
        gaussian_bhattacharyya(mu, cov, mu, torch.eye(2))
    with pytest.raises(ValueError, match="mu_q"):
        gaussian_wasserstein2(mu, cov, torch.zeros(2), cov)
    with pytest.raises(ValueError, match="broadcast"):
        gaussian_kl(torch.zeros(2, 3), cov.expand(2, 3, 3), torch.zeros(4, 3), cov)
    with pytest.raises(TypeError, match="dtype"):
        gaussian_kl(mu, cov, mu.double(), cov.double())
