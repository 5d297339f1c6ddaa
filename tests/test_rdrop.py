"""R-Drop: the symmetric KL / MSE kernels, the loss module and the two-pass helper."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from transformer_zoo import RDropLoss
from transformer_zoo.functional import rdrop_mse, symmetric_kl
from transformer_zoo.regularizers import two_pass_forward


def official_kl(p: torch.Tensor, q: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
    """Slow reference in the style of the official R-Drop code (its pad_mask: True = pad)."""
    p_loss = F.kl_div(F.log_softmax(p, dim=-1), F.softmax(q, dim=-1), reduction="none")
    q_loss = F.kl_div(F.log_softmax(q, dim=-1), F.softmax(p, dim=-1), reduction="none")
    if pad_mask is not None:
        p_loss = p_loss.masked_fill(pad_mask[..., None], 0.0)
        q_loss = q_loss.masked_fill(pad_mask[..., None], 0.0)
    return (p_loss.sum() + q_loss.sum()) / 2


shapes = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(2, 7))


@pytest.mark.cpu_only
@given(shapes, st.integers(0, 2**16))
def test_matches_official_reference(shape: tuple[int, int, int], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    p, q = (3 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(shape[:2], generator=g) > 0.3  # True = real token
    got = symmetric_kl(p, q, mask=mask, reduction="sum")
    torch.testing.assert_close(got, official_kl(p, q, ~mask))
    torch.testing.assert_close(symmetric_kl(p, q, reduction="sum"), official_kl(p, q, None))


@pytest.mark.cpu_only
@given(shapes, st.integers(0, 2**16))
def test_nonnegative_and_symmetric(shape: tuple[int, int, int], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    p, q = (5 * torch.randn(shape, generator=g) for _ in range(2))
    per_pos = symmetric_kl(p, q, reduction="none")
    assert per_pos.shape == shape[:2]
    assert (per_pos >= 0).all()
    torch.testing.assert_close(per_pos, symmetric_kl(q, p, reduction="none"))


def test_zero_for_identical_and_row_shifted_logits() -> None:
    p = 4 * torch.randn(3, 5, 11)
    assert symmetric_kl(p, p.clone(), reduction="sum") == 0
    shift = 100 * torch.randn(3, 5, 1)  # a constant per row does not change the softmax
    torch.testing.assert_close(
        symmetric_kl(p, p + shift, reduction="none"), torch.zeros(3, 5), atol=1e-5, rtol=0
    )


def test_masked_positions_do_not_change_the_loss() -> None:
    p, q = torch.randn(2, 2, 6, 9).unbind(0)  # (b, n, c) each
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    noise = torch.where(mask[..., None], 0.0, 50 * torch.randn(2, 6, 9))
    for reduction in ("sum", "mean", "batchmean", "none"):
        a = symmetric_kl(p, q, mask=mask, reduction=reduction)
        b = symmetric_kl(p + noise, q - noise, mask=mask, reduction=reduction)
        torch.testing.assert_close(a, b)


def test_reductions() -> None:
    p, q = torch.randn(2, 3, 4, 5).unbind(0)
    mask = torch.tensor([[True, True, False, False], [True] * 4, [False] * 4])
    none = symmetric_kl(p, q, mask=mask, reduction="none")
    assert (none[~mask] == 0).all()
    total = symmetric_kl(p, q, mask=mask, reduction="sum")
    torch.testing.assert_close(total, none.sum())
    torch.testing.assert_close(symmetric_kl(p, q, mask=mask, reduction="mean"), total / 6)
    torch.testing.assert_close(symmetric_kl(p, q, mask=mask, reduction="batchmean"), total / 3)
    # a mask with no real token gives 0, not NaN
    empty = torch.zeros(3, 4, dtype=torch.bool)
    assert symmetric_kl(p, q, mask=empty, reduction="mean") == 0
    # a broadcast mask (1, n) applies to every row
    row = torch.tensor([[True, False, True, True]])
    torch.testing.assert_close(
        symmetric_kl(p, q, mask=row, reduction="mean"),
        symmetric_kl(p, q, mask=row.expand(3, 4), reduction="mean"),
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_stable(dtype: torch.dtype) -> None:
    p = (1000 * torch.randn(4, 7)).to(dtype)  # exp would overflow fp16 without log_softmax
    q = (p.float() + torch.randn(4, 7)).to(dtype)
    got = symmetric_kl(p, q, reduction="none")
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, symmetric_kl(p.float(), q.float(), reduction="none"))


def test_gradients_finite_and_gradcheck() -> None:
    p = (80 * torch.randn(3, 4, 6)).requires_grad_()
    q = (80 * torch.randn(3, 4, 6)).requires_grad_()
    symmetric_kl(p, q, mask=torch.rand(3, 4) > 0.5).backward()
    assert torch.isfinite(p.grad).all() and torch.isfinite(q.grad).all()
    p64 = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    q64 = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    assert torch.autograd.gradcheck(lambda a, b: symmetric_kl(a, b, mask=mask), (p64, q64))
    mse = lambda a, b: rdrop_mse(a, b, mask=mask[..., None])  # noqa: E731
    assert torch.autograd.gradcheck(mse, (p64, q64))


def test_mse_form() -> None:
    a, b = torch.randn(2, 8, 3).unbind(0)
    torch.testing.assert_close(rdrop_mse(a, b), F.mse_loss(a, b))
    torch.testing.assert_close(rdrop_mse(a, b, reduction="sum"), F.mse_loss(a, b, reduction="sum"))
    mask = torch.rand(8, 3) > 0.5
    torch.testing.assert_close(
        rdrop_mse(a, b, mask=mask), ((a - b)[mask] ** 2).mean(), msg="mean over kept elements"
    )
    assert rdrop_mse(a, a) == 0


def test_rdrop_loss_module_formula() -> None:
    ce = nn.CrossEntropyLoss()
    p, q = torch.randn(2, 6, 4).unbind(0)
    y = torch.randint(0, 4, (6,))
    loss = RDropLoss(5.0, ce)(p, q, y)
    expected = ce(p, y) + ce(q, y) + 5.0 * symmetric_kl(p, q, reduction="mean")
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(RDropLoss(0.0, ce)(p, q, y), ce(p, y) + ce(q, y))
    reg = RDropLoss(0.7, nn.MSELoss(), consistency="mse")
    a, b, t = torch.randn(3, 6).unbind(0)
    torch.testing.assert_close(
        reg(a, b, t), F.mse_loss(a, t) + F.mse_loss(b, t) + 0.7 * F.mse_loss(a, b)
    )


def test_eval_mode_gives_zero_consistency_and_train_mode_does_not() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 5))
    x, y = torch.randn(10, 8), torch.randint(0, 5, (10,))
    ce = nn.CrossEntropyLoss()
    rdrop = RDropLoss(1.0, ce)
    model.eval()
    p, q = two_pass_forward(model, x)
    assert symmetric_kl(p, q) == 0
    torch.testing.assert_close(rdrop(p, q, y), 2 * ce(model(x), y))
    model.train()
    p, q = two_pass_forward(model, x)
    assert symmetric_kl(p, q) > 0
    rdrop(p, q, y).backward()
    assert all(torch.isfinite(w.grad).all() for w in model.parameters())


def test_validation() -> None:
    p = torch.randn(3, 4)
    with pytest.raises(ValueError, match="reduction"):
        symmetric_kl(p, p, reduction="avg")
    with pytest.raises(ValueError, match="same shape"):
        symmetric_kl(p, torch.randn(3, 5))
    with pytest.raises(ValueError, match="batch, ..., classes"):
        symmetric_kl(torch.randn(4), torch.randn(4))
    with pytest.raises(TypeError, match="boolean"):
        symmetric_kl(p, p, mask=torch.ones(3))
    with pytest.raises(ValueError, match="broadcastable"):
        symmetric_kl(p, p, mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="dtype"):
        symmetric_kl(p, p.double())
    with pytest.raises(ValueError, match="alpha"):
        RDropLoss(-1.0, nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="consistency"):
        RDropLoss(1.0, nn.CrossEntropyLoss(), consistency="js")
    with pytest.raises(ValueError, match="reduction"):
        RDropLoss(1.0, nn.CrossEntropyLoss(), reduction="none")
    with pytest.raises(TypeError, match="task_loss"):
        RDropLoss(1.0, "ce")
