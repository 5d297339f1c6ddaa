"""benchmarks/contenders_fla.py: the glue that feeds our FAVOR+ features to
flash-linear-attention's chunked kernel, checked on the CPU against our causal FAVOR+ with a
pure-torch stand-in for the kernel (fla's kernels are Triton, CUDA only). With fla installed
and the suite on CUDA, the real kernel is checked too."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from benchmarks import contenders_fla as cf
from transformer_zoo.functional import draw_projection, favor_attention


def _qkv(n: int, *, b: int = 2, h: int = 3, d: int = 8, scale: float = 0.7,
         dtype: torch.dtype = torch.float64, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return tuple((torch.randn(b, h, n, d, generator=g, device="cpu", dtype=dtype) * scale)
                 .to(torch.get_default_device()) for _ in range(3))


def _quadratic_linear_attention(q, k, v, scale):
    """o_t = scale · Σ_{s≤t} (q_t · k_s) v_s, inputs (b, n, h, ·)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    n = q.shape[-2]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    out = scale * (q @ k.transpose(-2, -1)).masked_fill(~causal, 0.0) @ v
    return out.transpose(1, 2)


@pytest.mark.parametrize("n", [1, 5, 64, 70, 130])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_stand_in_is_chunked_causal_linear_attention(n, chunk):
    q, k, v = (t.transpose(1, 2).exp() for t in _qkv(n))  # (b, n, h, d), positive q, k
    scale = 0.3
    out, state = cf.reference_chunk_linear_attn(q, k, v, scale=scale, normalize=False,
                                                chunk_size=chunk)
    assert state is None
    expected = _quadratic_linear_attention(q, k, v, scale)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    normed, _ = cf.reference_chunk_linear_attn(q, k, v, normalize=True, chunk_size=chunk)
    den = (q * k.cumsum(1)).sum(-1, keepdim=True) * q.shape[-1] ** -0.5 + 1e-10
    torch.testing.assert_close(normed, _quadratic_linear_attention(q, k, v, q.shape[-1] ** -0.5)
                               / den, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 63, 64, 70, 130])
def test_glue_equals_our_causal_favor(n):
    """Same features, same denominator, another prefix sum: equal at moderate norms (fp64:
    to rounding; fp32 inputs: to fp32 rounding)."""
    q, k, v = _qkv(n)
    w = draw_projection(16, 8, seed=1).to(q.device)
    ours = favor_attention(q, k, v, w, causal=True)
    glue = cf.favor_on_linear_kernel(q, k, v, w, kernel=cf.reference_chunk_linear_attn)
    torch.testing.assert_close(glue, ours, rtol=1e-10, atol=1e-12)
    q32, k32, v32 = (t.float() for t in (q, k, v))
    glue32 = cf.favor_on_linear_kernel(q32, k32, v32, w, kernel=cf.reference_chunk_linear_attn)
    assert glue32.dtype == torch.float32
    torch.testing.assert_close(glue32.double(), ours, rtol=1e-4, atol=1e-5)


def test_glue_is_causal_and_uses_scale_one():
    """A change after position t leaves outputs up to t alone; and the kernel's own scale
    must be 1 (a kernel that kept its default K^(-1/2) would change every output)."""
    q, k, v = _qkv(40)
    w = draw_projection(16, 8, seed=1).to(q.device)
    base = cf.favor_on_linear_kernel(q, k, v, w, kernel=cf.reference_chunk_linear_attn)
    k2, v2 = k.clone(), v.clone()
    k2[..., 25:, :] += 1.0
    v2[..., 25:, :] -= 2.0
    moved = cf.favor_on_linear_kernel(q, k2, v2, w, kernel=cf.reference_chunk_linear_attn)
    torch.testing.assert_close(moved[..., :25, :], base[..., :25, :], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(moved[..., 25:, :], base[..., 25:, :])

    def default_scale(q, k, v, *, scale, normalize):
        return cf.reference_chunk_linear_attn(q, k, v, normalize=normalize)

    wrong = cf.favor_on_linear_kernel(q, k, v, w, kernel=default_scale)
    assert not torch.allclose(wrong, base)


@pytest.mark.cpu_only
def test_unavailable_says_why(monkeypatch):
    reason = cf.unavailable(torch.device("cpu"))[cf.NAME]
    assert "Triton" in reason and "CUDA only" in reason
    monkeypatch.setattr(cf, "fla_kernel", lambda: None)
    assert "not installed" in cf.unavailable(torch.device("cuda"))[cf.NAME]
    with pytest.raises(RuntimeError, match="not installed"):
        cf.fla_causal_favor(8)


def _fake_fla(monkeypatch, chunk_linear_attn) -> None:
    for name in ("fla", "fla.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    leaf = types.ModuleType("fla.ops.linear_attn")
    leaf.chunk_linear_attn = chunk_linear_attn
    monkeypatch.setitem(sys.modules, "fla.ops.linear_attn", leaf)


@pytest.mark.cpu_only
def test_fla_kernel_asks_old_releases_for_the_sequence_first_layout(monkeypatch):
    seen = {}

    def old(q, k, v, scale=None, normalize=True, head_first=True):
        seen["head_first"] = head_first
        return cf.reference_chunk_linear_attn(q, k, v, scale=scale, normalize=normalize)

    _fake_fla(monkeypatch, old)
    kernel = cf.fla_kernel()
    q, k, v = (t.transpose(1, 2).exp() for t in _qkv(5))
    kernel(q, k, v, scale=1.0, normalize=False)
    assert seen == {"head_first": False}

    def new(q, k, v, scale=None, normalize=True):
        return None

    _fake_fla(monkeypatch, new)
    assert cf.fla_kernel() is new
    monkeypatch.setitem(sys.modules, "fla.ops.linear_attn", None)  # import fails
    assert cf.fla_kernel() is None


def test_real_fla_kernel_matches_our_scan_on_cuda(device):
    if device.type != "cuda" or cf.fla_kernel() is None:
        pytest.skip("needs flash-linear-attention and the suite on CUDA (--device cuda)")
    q, k, v = (t.float() for t in _qkv(300, d=64, scale=0.5))
    w = draw_projection(256, 64, seed=0).to(device)
    ours = favor_attention(q, k, v, w, causal=True)
    theirs = cf.favor_on_linear_kernel(q, k, v, w, kernel=cf.fla_kernel())
    # Triton may run fp32 dots in TF32 (~1e-3); a layout or scale mistake is O(1)
    torch.testing.assert_close(theirs, ours, rtol=1e-2, atol=1e-2)
