"""Run transformer_zoo attention kernels inside Hugging Face transformers (5.x) models.

    head_i = Kernel(Q_i, K_i, V_i) with the model's own projections, scaling and dropout.

HF models call ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)`` with
``(module, query, key, value, attention_mask, dropout=..., scaling=..., **kwargs)``; q is
``(b, h, n, d)``, k/v ``(b, h_kv, m, d)`` (grouped-query attention when h_kv < h), and the
function returns ``((b, n, h, d), weights or None)``. A name must be registered with
``AttentionInterface`` **and** ``AttentionMaskInterface``: without the mask function HF passes
``attention_mask=None`` and padding is silently ignored.

``use(model, "softmax")`` registers the kernel under ``"tz_softmax"``, attaches the kernel
adapter (and any per-module state, as buffers) to every attention module and selects it with
``model.set_attn_implementation``. With the softmax kernel the result equals HF's own ``sdpa``
(tests: <= 1e-5 on BERT and a GQA Llama, with padding; cosine 1.00000 on all-MiniLM-L6-v2).

Adding a kernel = one ``HFKernel`` subclass (see ``SoftmaxKernel``): ``name``, whether it takes
HF's dense masks (``dense_mask``) or only key padding + the causal flag, whether it takes k/v
with fewer heads (``grouped_kv``), ``setup`` for per-module buffers, and ``attend``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedConfig, PreTrainedModel
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    sdpa_mask,
)

from transformer_zoo.functional.softmax import (
    expand_kv_heads,
    explicit_softmax_attention,
    softmax_attention,
)
from transformer_zoo.interop._masks import split_additive

_UNSUPPORTED = ("softcap", "s_aux", "sinks")


class HFKernel:
    """Adapter protocol between HF's attention call and one transformer_zoo kernel.

    Subclasses are dataclasses whose fields are the kernel's options (typos raise TypeError).
    """

    #: Short kernel name; HF sees it as ``"tz_" + name``.
    name: ClassVar[str]
    #: True: receive HF's dense ``(b, 1, n, m)`` boolean masks (any pattern: causal, sliding
    #: window, packed sequences). False: receive only key padding and the causal flag.
    dense_mask: ClassVar[bool] = False
    #: True: ``attend`` takes k/v with h_kv < h heads; otherwise they are repeated first.
    grouped_kv: ClassVar[bool] = False

    @classmethod
    def hf_name(cls) -> str:
        return f"tz_{cls.name}"

    def setup(self, module: nn.Module, head_dim: int) -> None:
        """Attach per-module state to an HF attention module (idempotent). Default: none."""

    def attend(
        self, module: nn.Module, q: Tensor, k: Tensor, v: Tensor, *,
        key_padding_mask: Tensor | None, attn_mask: Tensor | None, bias: Tensor | None,
        causal: bool, dropout: float, scaling: float | None, need_weights: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """q ``(b, h, n, d)``, k/v ``(b, h|h_kv, m, d)`` -> ``((b, h, n, d), weights|None)``.

        ``key_padding_mask`` ``(b, m)`` True = real token; ``attn_mask`` boolean True = attend
        and ``bias`` additive, both broadcastable to ``(b, h, n, m)`` (dense kernels only).
        """
        raise NotImplementedError


@dataclass
class SoftmaxKernel(HFKernel):
    """Exact softmax attention (Vaswani et al. 2017, arXiv 1706.03762) on SDPA.

    Takes every mask HF builds, float biases (``position_bias``) and GQA; returns the weights
    when the model asks for ``output_attentions``.
    """

    name: ClassVar[str] = "softmax"
    dense_mask: ClassVar[bool] = True
    grouped_kv: ClassVar[bool] = True

    def attend(self, module, q, k, v, *, key_padding_mask, attn_mask, bias, causal, dropout,
               scaling, need_weights):
        options = dict(mask=attn_mask, bias=bias, causal=causal, dropout_p=dropout, scale=scaling)
        if need_weights:
            return explicit_softmax_attention(q, k, v, training=dropout > 0, **options)
        return softmax_attention(q, k, v, **options), None


#: Built-in kernels by short name; ``use(model, name)`` looks names up here.
KERNELS: dict[str, type[HFKernel]] = {"softmax": SoftmaxKernel}


def padding_only_mask(
    batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
    mask_function: Callable = causal_mask_function, attention_mask: Tensor | None = None,
    local_size: int | None = None, **kwargs: Any,
) -> Tensor | None:
    """``AttentionMaskInterface`` function for kernels that take key padding + a causal flag.

    Returns ``(b, 1, 1, m)`` boolean (True = real key) or None without padding. Raises for
    mask patterns such kernels cannot express (sliding windows, packed sequences, chunks).
    """
    if mask_function not in (causal_mask_function, bidirectional_mask_function) or local_size:
        raise ValueError(
            f"this kernel takes only key padding and causal masks; the model asked for the "
            f"pattern {getattr(mask_function, '__name__', mask_function)!r} "
            f"(local_size={local_size}); use the softmax kernel for this model"
        )
    if attention_mask is None:
        return None
    pad = kv_length + kv_offset - attention_mask.shape[-1]
    padding = torch.nn.functional.pad(attention_mask, (0, pad)) if pad > 0 else attention_mask
    padding = padding[:, kv_offset:kv_offset + kv_length].to(torch.bool)  # (b, m)
    return None if bool(padding.all()) else padding[:, None, None, :]


def _attention_function(kernel_cls: type[HFKernel]) -> Callable:
    """The function HF calls for ``kernel_cls``: masks, causality and GQA in our convention."""

    def forward(
        module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
        attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
        is_causal: bool | None = None, position_bias: Tensor | None = None, **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None]:
        kernel = getattr(module, "tz_kernel", None)
        kernel = kernel if isinstance(kernel, kernel_cls) else kernel_cls()
        kernel.setup(module, query.shape[-1])
        where = f"{kernel_cls.hf_name()} in {type(module).__name__}"
        for option in _UNSUPPORTED:
            if kwargs.get(option) is not None:
                raise ValueError(f"{where}: {option!r} is not supported")
        n, m = query.shape[2], key.shape[2]
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
        allowed, bias = attention_mask, None
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            allowed, bias = split_additive(attention_mask)
        if position_bias is not None:
            bias = position_bias if bias is None else bias + position_bias
        kpm = None
        if kernel_cls.dense_mask:
            # HF's rule: a given mask already holds causality; without one, n == m or n == 1.
            causal = bool(causal) and attention_mask is None and n > 1
            if causal and m > n:  # prefill into an empty static cache: keys past n are empty
                key, value = key[:, :, :n], value[:, :, :n]
        else:
            causal = bool(causal) and n > 1
            if bias is not None or (allowed is not None and allowed.shape[-2] != 1):
                shape = tuple(attention_mask.shape)
                raise ValueError(f"{where}: takes key padding masks (b, 1, 1, m) and the causal "
                                 f"flag only, got a {attention_mask.dtype} mask of shape {shape}")
            if allowed is not None:
                kpm, allowed = allowed[:, 0, 0, :].expand(query.shape[0], m), None  # (b, m)
        if not kernel_cls.grouped_kv:
            key, value = expand_kv_heads(key, value, query.shape[1])
        out, weights = kernel.attend(
            module, query, key, value, key_padding_mask=kpm, attn_mask=allowed, bias=bias,
            causal=causal, dropout=dropout, scaling=scaling,
            need_weights=bool(kwargs.get("output_attentions", False)),
        )
        return out.transpose(1, 2).contiguous(), weights  # (b, n, h, d)

    forward.__name__ = f"{kernel_cls.hf_name()}_attention_forward"
    return forward


def register(kernel_cls: type[HFKernel]) -> str:
    """Register ``kernel_cls`` with AttentionInterface and AttentionMaskInterface; return its
    HF name. Idempotent; ``use`` calls it."""
    name = kernel_cls.hf_name()
    AttentionInterface.register(name, _attention_function(kernel_cls))
    AttentionMaskInterface.register(name, sdpa_mask if kernel_cls.dense_mask else padding_only_mask)
    return name


def _head_dim(module: nn.Module) -> int | None:
    """HF attention modules: a config, an ``is_causal`` flag and a head width."""
    if not isinstance(getattr(module, "config", None), PreTrainedConfig):
        return None
    if isinstance(module, PreTrainedModel) or not hasattr(module, "is_causal"):
        return None
    head_dim = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
    return head_dim if isinstance(head_dim, int) else None


def use(model: PreTrainedModel, kernel: str | HFKernel, **options: Any) -> list[str]:
    """Run ``kernel`` in every attention layer of ``model``; return the attention module paths.

    Args:
        model: a transformers 5.x model whose attention uses ``AttentionInterface``.
        kernel: a short name from ``KERNELS`` (``"softmax"``) or an ``HFKernel`` instance.
        **options: the kernel's options (fields of its adapter dataclass; typos raise).

    Per-module state (``setup``) is created now, as buffers, so it saves with the model. To go
    back: ``model.set_attn_implementation("sdpa")``.
    """
    if isinstance(kernel, str):
        if kernel not in KERNELS:
            raise ValueError(f"kernel: expected one of {sorted(KERNELS)}, got {kernel!r}")
        kernel = KERNELS[kernel](**options)
    elif options:
        raise TypeError("options go to the kernel's constructor; pass a name, or no options")
    if not isinstance(kernel, HFKernel):
        raise TypeError(f"kernel: expected a name or an HFKernel, got {type(kernel).__name__}")
    name = register(type(kernel))
    paths = []
    for path, module in model.named_modules():
        head_dim = _head_dim(module)
        if head_dim is not None:
            module.tz_kernel = kernel
            kernel.setup(module, head_dim)
            paths.append(path)
    model.set_attn_implementation(name)
    return paths


for _kernel in KERNELS.values():  # so attn_implementation="tz_softmax" works at load time
    register(_kernel)
