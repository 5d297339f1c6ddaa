"""The library on the suite's device (``pytest --device cuda``; default cpu), used as a user would.

Modules are built on the CPU and moved with ``.to(device)``, inputs are made on the CPU and
moved, and inside each test torch's default device is the CPU again (the suite sets it to
``--device``): a tensor the library creates without ``device=`` then shows up as a device
mismatch, as it would in a user's script, instead of being rescued by the suite's default.

Every attention × compatible encoding (``reliability_cases.pairs``), bidirectional and, where
the attention supports it, causal; forward and backward through a one-layer ``Encoder`` with
padded samples:

- fp32 on the device agrees with fp32 on the CPU (same weights, same inputs): outputs and
  gradients within ``DEVICE_BOUND`` relative (on a CPU run both sides are the CPU);
- under autocast in the dtypes GPUs train in (CUDA: fp16, and bf16 where the GPU has it; the
  CPU: bf16 and fp16): finite outputs and gradients, padded rows exactly 0, and output and
  gradient errors against fp32 on the same device within ``AUTOCAST_BOUND``.

``tests/test_reliability_precision.py`` covers the kernels and encodings over a sweep of
norms and sizes, forward only, with CPU autocast (it is ``cpu_only``); this file is the
device-generic forward + backward check.
"""

from __future__ import annotations

import copy

import pytest
import torch
from reliability_cases import SMALL, encoder_config, pair_id, pairs

from transformer_zoo import Encoder

# relative errors (max-abs for outputs, Frobenius for gradients); worst measured on the CPU
# (torch 2.13, every case below): outputs 2.0e-3 bf16 / 3.3e-4 fp16, gradients 4.0e-3 / 5.2e-4
AUTOCAST_BOUND = {torch.bfloat16: 2e-2, torch.float16: 4e-3}
DEVICE_BOUND = 1e-4  # fp32 on the device vs fp32 on the CPU


def autocast_dtypes(device: torch.device) -> list[torch.dtype]:
    """The low-precision dtypes to check on ``device``."""
    if device.type == "cuda":
        return [torch.float16] + ([torch.bfloat16] if torch.cuda.is_bf16_supported() else [])
    return [torch.bfloat16, torch.float16]  # CPU autocast has both (torch >= 2.1)


def cases() -> list:
    out = []
    for pair in pairs():
        for causal in (False, True):
            if causal and not pair[0].supports_causal:
                continue
            out.append(pytest.param(pair, causal,
                                    id=f"{pair_id(pair)}{'-causal' if causal else ''}"))
    return out


@pytest.fixture
def cpu_default():
    """Torch's default device is the CPU inside the test, as in a user's script."""
    before = torch.get_default_device()
    if before.type == "cpu":  # already: setting it again would leave a DeviceContext mode
        yield  # on torch's function-mode stack for the rest of the session (dynamo trips on it)
        return
    torch.set_default_device("cpu")
    yield
    torch.set_default_device(before)


def _inputs(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """x (2, n, d_model); mask (2, n), the second sample padded after n // 2 + 1 tokens;
    r (2, n, d_model), the weights of the loss sum(r · out)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(2, n, SMALL.d_model, generator=g, device="cpu")
    mask = torch.ones(2, n, dtype=torch.bool, device="cpu")
    mask[1, n // 2 + 1:] = False
    r = torch.randn(2, n, SMALL.d_model, generator=g, device="cpu")
    return x, mask, r


def _run(model: Encoder, x, mask, r, dtype: torch.dtype | None):
    """(output, gradients of sum(r · out) w.r.t. x and every parameter)."""
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    if dtype is None:
        out = model(x, mask=mask)
    else:
        with torch.autocast(x.device.type, dtype=dtype):
            out = model(x, mask=mask)
    (out.float() * r).sum().backward()
    grads = [x.grad] + [p.grad for p in model.parameters() if p.grad is not None]
    return out, grads


def _relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = torch.sqrt(sum(((s.double().cpu() - t.double().cpu()) ** 2).sum() for s, t in zip(
        a, b, strict=True)))
    den = torch.sqrt(sum((t.double().cpu() ** 2).sum() for t in b))
    return float(num / den)


def _max_relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out - ref).abs().max() / ref.abs().max())


def _models(pair, causal: bool, device: torch.device) -> tuple[Encoder, Encoder]:
    torch.manual_seed(0)
    cpu_model = Encoder(encoder_config(*pair, n_layers=1, causal=causal)).eval()
    return cpu_model, copy.deepcopy(cpu_model).to(device)


@pytest.mark.parametrize(("pair", "causal"), cases())
def test_fp32_on_the_device_matches_the_cpu(pair, causal, device, cpu_default):
    cpu_model, model = _models(pair, causal, device)
    x, mask, r = _inputs()
    ref, ref_grads = _run(cpu_model, x, mask, r, None)
    out, grads = _run(model, x.to(device), mask.to(device), r.to(device), None)
    assert out.device.type == device.type and out.dtype == torch.float32
    assert _max_relative(out, ref) <= DEVICE_BOUND
    assert len(grads) == len(ref_grads)
    assert _relative(grads, ref_grads) <= DEVICE_BOUND


@pytest.mark.parametrize(("pair", "causal"), cases())
def test_forward_and_backward_under_autocast(pair, causal, device, cpu_default):
    _, model = _models(pair, causal, device)
    x, mask, r = (t.to(device) for t in _inputs())
    ref, ref_grads = _run(model, x, mask, r, None)
    for dtype in autocast_dtypes(device):
        out, grads = _run(model, x, mask, r, dtype)
        assert torch.isfinite(out).all(), dtype
        assert all(torch.isfinite(g).all() for g in grads), dtype
        assert (out[~mask] == 0).all(), dtype
        out_err, grad_err = _max_relative(out, ref), _relative(grads, ref_grads)
        assert out_err <= AUTOCAST_BOUND[dtype], f"{dtype}: output error {out_err:.2e}"
        assert grad_err <= AUTOCAST_BOUND[dtype], f"{dtype}: gradient error {grad_err:.2e}"


def test_autocast_takes_effect(device, cpu_default):
    """The autocast check is not vacuous: on this device every checked dtype changes the
    output (autocast ran the matmuls in low precision), by more than fp32 rounding."""
    pair = next(p for p in pairs() if p[1] is None and p[0].__name__ == "SoftmaxAttention")
    _, model = _models(pair, False, device)
    x, mask, r = (t.to(device) for t in _inputs())
    ref, _ = _run(model, x, mask, r, None)
    errors = {dtype: _max_relative(_run(model, x, mask, r, dtype)[0], ref)
              for dtype in autocast_dtypes(device)}
    assert errors and all(err > 1e-5 for err in errors.values()), errors
