"""Unsupervised SimCSE loss: slow reference, limits, symmetry, training signal."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from transformer_zoo import SimCSELoss
from transformer_zoo.functional import simcse_loss


def reference_loss(z1: torch.Tensor, z2: torch.Tensor, tau: float, symmetric: bool) -> float:
    """Slow explicit InfoNCE: loops over rows, cosine written out."""

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(a @ b / (a.norm() * b.norm()))

    def one_way(a: torch.Tensor, b: torch.Tensor) -> float:
        total = 0.0
        for i in range(len(a)):
            logits = [cos(a[i], b[j]) / tau for j in range(len(b))]
            total -= logits[i] - math.log(sum(math.exp(s) for s in logits))
        return total / len(a)

    forward = one_way(z1, z2)
    return 0.5 * (forward + one_way(z2, z1)) if symmetric else forward


@pytest.mark.cpu_only
@given(
    st.integers(1, 6), st.integers(1, 8), st.floats(0.02, 1.0), st.booleans(), st.integers(0, 999)
)
def test_matches_slow_reference(b: int, d: int, tau: float, symmetric: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, d, generator=g, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(b, d, generator=g, dtype=torch.float64)
    got = simcse_loss(z1, z2, temperature=tau, symmetric=symmetric)
    assert got.item() == pytest.approx(reference_loss(z1, z2, tau, symmetric), rel=1e-9, abs=1e-12)


def test_aligned_separated_views_give_near_zero_and_loss_falls_with_alignment() -> None:
    z = torch.eye(8, 16) * 3.0  # 8 orthogonal directions: cos 1 with itself, 0 with others
    assert simcse_loss(z, z.clone()) < 1e-6  # log(1 + 7 e^(-20)) ≈ 1.4e-8
    noise = torch.randn(8, 16)
    losses = [simcse_loss(z, z + s * noise).item() for s in (3.0, 1.0, 0.3, 0.1, 0.0)]
    assert losses == sorted(losses, reverse=True)
    # identical views all along one direction carry no signal: loss = log b
    same = torch.ones(8, 16)
    assert simcse_loss(same, same).item() == pytest.approx(math.log(8), rel=1e-6)


def test_training_the_views_drives_the_loss_to_zero() -> None:
    z1 = torch.randn(6, 8, requires_grad=True)
    z2 = torch.randn(6, 8, requires_grad=True)
    opt = torch.optim.Adam([z1, z2], lr=0.1)
    start = simcse_loss(z1, z2).item()
    for _ in range(30):
        opt.zero_grad()
        simcse_loss(z1, z2).backward()
        opt.step()
    assert simcse_loss(z1, z2).item() < 0.01 < start


def test_symmetric_option() -> None:
    z1, z2 = torch.randn(2, 5, 7).unbind(0)
    one, back = simcse_loss(z1, z2), simcse_loss(z2, z1)
    assert not torch.isclose(one, back)  # one-directional InfoNCE is not symmetric
    sym = simcse_loss(z1, z2, symmetric=True)
    torch.testing.assert_close(sym, 0.5 * (one + back))
    torch.testing.assert_close(sym, simcse_loss(z2, z1, symmetric=True))


def test_cosine_invariance_module_and_dtypes() -> None:
    z1, z2 = torch.randn(2, 5, 7).unbind(0)
    scale = torch.rand(5, 1) * 10 + 0.1
    torch.testing.assert_close(simcse_loss(z1 * scale, z2), simcse_loss(z1, z2))
    module = SimCSELoss(temperature=0.1)
    torch.testing.assert_close(module(z1, z2), simcse_loss(z1, z2, temperature=0.1))
    logits = F.normalize(z1, dim=-1) @ F.normalize(z2, dim=-1).T / 0.05
    torch.testing.assert_close(simcse_loss(z1, z2), F.cross_entropy(logits, torch.arange(5)))
    half = simcse_loss(z1.bfloat16(), z2.bfloat16())
    assert half.dtype == torch.float32 and torch.isfinite(half)
    zero = torch.zeros(3, 4)
    assert torch.isfinite(simcse_loss(zero, torch.randn(3, 4)))


def test_gradcheck() -> None:
    z1 = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b: simcse_loss(a, b, temperature=0.2, symmetric=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z1, z2))


def test_validation() -> None:
    z = torch.randn(4, 5)
    with pytest.raises(ValueError, match="temperature"):
        simcse_loss(z, z, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SimCSELoss(temperature=-1.0)
    with pytest.raises(ValueError, match="same shape"):
        simcse_loss(z, torch.randn(3, 5))
    with pytest.raises(ValueError, match="2-D"):
        simcse_loss(z[None], z[None])
    with pytest.raises(TypeError, match="floating"):
        simcse_loss(z.long(), z.long())
