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

Any ``MultiHeadAttention`` subclass runs too: ``use(model, functools.partial(
PerformerAttention, nb_features=256))`` wraps it in ``AttentionKernel``, which keeps the kernel's
state (buffers) on each HF attention module and calls its ``attend``. A named kernel is one
``HFKernel`` subclass (``hf_kernels.py``) added to ``KERNELS``.

Decoding with a cache: a kernel with a recurrent form (``PerformerAttention``) keeps its
fixed-size state in HF's cache instead of keys and values (``hf_cache.py``: ``use`` registers
the pre-hook that puts a ``RecurrentLayer`` in each such layer's place).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedConfig, PreTrainedModel
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    sdpa_mask,
)

from transformer_zoo.attention.multihead import MultiHeadAttention
from transformer_zoo.functional.softmax import expand_kv_heads
from transformer_zoo.interop._masks import settle_bias, split_additive
from transformer_zoo.interop.hf_cache import (
    RecurrentCache,
    RecurrentLayer,
    bind_cache,
    unbind_cache,
)
from transformer_zoo.interop.hf_kernels import (
    KERNELS,
    AttentionKernel,
    HFKernel,
    HybridWindowKernel,
    ModuleKernel,
    NystromKernel,
    PerformerKernel,
    SoftmaxKernel,
    check_factory,
)

__all__ = ["KERNELS", "AttentionKernel", "HFKernel", "HybridWindowKernel", "ModuleKernel",
           "NystromKernel",
           "PerformerKernel", "RecurrentCache", "RecurrentLayer", "SoftmaxKernel",
           "padding_only_mask", "register", "use"]

_UNSUPPORTED = ("softcap", "s_aux", "sinks")


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
    if not torch.compiler.is_compiling() and bool(padding.all()):  # eager: skip a no-op mask
        return None
    return padding[:, None, None, :]


def _attention_function(kernel_cls: type[HFKernel]) -> Callable:
    """The function HF calls for ``kernel_cls``: masks, causality and GQA in our convention."""

    def forward(
        module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
        attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
        is_causal: bool | None = None, position_bias: Tensor | None = None, **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None]:
        where = f"{kernel_cls.hf_name()} in {type(module).__name__}"
        kernel = getattr(module, "tz_kernel", None)
        if not isinstance(kernel, kernel_cls):
            try:
                kernel = kernel_cls()
            except TypeError as err:
                raise ValueError(f"{where}: no kernel attached; call transformer_zoo.interop."
                                 "huggingface.use(model, kernel) first") from err
        kernel.setup(module, query.shape[1], query.shape[-1])
        for option in _UNSUPPORTED:
            if kwargs.get(option) is not None:
                raise ValueError(f"{where}: {option!r} is not supported")
        n, m = query.shape[2], key.shape[2]
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
        allowed, bias = attention_mask, None
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            allowed, bias = split_additive(attention_mask)
            bias = settle_bias(bias, takes_bias=kernel_cls.dense_mask, message=(
                f"{where}: takes key padding masks and the causal flag only, got a float "
                "mask with values other than 0 and finfo.min"))
        if position_bias is not None:
            bias = position_bias if bias is None else bias + position_bias
        kpm = None
        layer = getattr(module, "tz_cache_layer", None)
        if isinstance(layer, RecurrentLayer) and layer.holds(key):  # new tokens on the state
            if bias is not None or (allowed is not None and allowed.shape[-2] != 1):
                raise ValueError(f"{where}: a recurrent state takes key padding masks only")
            if allowed is not None:
                kpm = allowed[:, 0, 0, -m:].expand(query.shape[0], m)  # the new tokens' padding
            if not kernel_cls.grouped_kv:
                key, value = expand_kv_heads(key, value, query.shape[1])
            out = kernel.attend_cached(module, query, key, value, layer, key_padding_mask=kpm,
                                       scaling=scaling)
            return out.transpose(1, 2).contiguous(), None
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


def _first(obj: object, names: tuple[str, ...]) -> int | None:
    values = [getattr(obj, name, None) for name in names]
    return next((v for v in values if isinstance(v, int) and not isinstance(v, bool)), None)


def _heads(module: nn.Module) -> tuple[int, int] | None:
    """(heads, head_dim) of an HF attention module: a config, a causal/decoder flag, widths."""
    config = getattr(module, "config", None)
    if not isinstance(config, PreTrainedConfig) or isinstance(module, PreTrainedModel):
        return None
    if not (hasattr(module, "is_causal") or hasattr(module, "is_decoder")):
        return None
    head_dim = _first(module, ("head_dim", "attention_head_size", "key_value_proj_dim"))
    heads = _first(module, ("num_heads", "num_attention_heads", "n_heads"))
    heads = heads or _first(config, ("num_attention_heads",))
    return None if heads is None or head_dim is None else (heads, head_dim)


def use(
    model: PreTrainedModel,
    kernel: str | HFKernel | Callable[..., MultiHeadAttention],
    **options: Any,
) -> list[str]:
    """Run ``kernel`` in every attention layer of ``model``; return the attention module paths.

    Args:
        model: a transformers 5.x model whose attention uses ``AttentionInterface``.
        kernel: a short name from ``KERNELS`` (``"softmax"``), an ``HFKernel`` instance, or a
            ``MultiHeadAttention`` subclass / factory (wrapped in ``AttentionKernel``).
        **options: the named kernel's options (fields of its adapter dataclass; typos raise).

    Decoding with a cache (``generate``, ``forward(use_cache=True)``): layers whose kernel has a
    recurrent form (``"performer"`` on a causal model) keep their fixed-size state in the
    cache (``hf_cache.RecurrentLayer``) instead of keys and values; the others keep HF's KV
    cache (``recurrent_cache=False`` keeps it everywhere).

    Per-module state is created now (replacing any from an earlier ``use``), as buffers, so it
    saves with the model: to restore it, ``use`` the same kernel, then ``load_state_dict``.
    To go back: ``model.set_attn_implementation("sdpa")``.

    Raises TypeError for a model that is not a ``PreTrainedModel`` or a module instance as
    ``kernel``; ValueError when no attention module is found, or when the kernel has no causal
    form and the model's attention is causal (Nyström in Llama), before anything changes.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model: expected a transformers PreTrainedModel, got "
                        f"{type(model).__name__}; for nn.MultiheadAttention models use "
                        "transformer_zoo.interop.swap_attention")
    if isinstance(kernel, str):
        if kernel not in KERNELS:
            raise ValueError(f"kernel: expected one of {sorted(KERNELS)}, got {kernel!r}")
        kernel = KERNELS[kernel](**options)
    elif options:
        raise TypeError("options go to a named kernel's constructor; got options with "
                        f"{type(kernel).__name__}")
    elif not isinstance(kernel, HFKernel):
        check_factory(kernel, "kernel")
        kernel = AttentionKernel(kernel)
    targets = [(path, module, shape) for path, module in model.named_modules()
               if (shape := _heads(module)) is not None]
    if not targets:
        raise ValueError(f"found no attention module in {type(model).__name__} (a module with "
                         "the model's config, an is_causal or is_decoder flag and a head count)")
    if isinstance(kernel, ModuleKernel):  # a kernel without a causal form fails now
        for path, module, _ in targets:
            if getattr(module, "is_causal", False):
                kernel.check_causal(module, path)
                break
    name = register(type(kernel))
    for _, module, shape in targets:
        if "tz_attention" in module._modules:
            del module.tz_attention
        module.tz_kernel = kernel
        kernel.setup(module, *shape)
        for handle in module.__dict__.pop("_tz_cache_hooks", ()):  # from an earlier use()
            handle.remove()
        module._tz_cache_hooks = (  # recurrent kernels decode on their state (hf_cache.py)
            module.register_forward_pre_hook(bind_cache, with_kwargs=True),
            module.register_forward_hook(unbind_cache, with_kwargs=True, always_call=True),
        )
    model.set_attn_implementation(name)
    return [path for path, _, _ in targets]


for _kernel in KERNELS.values():  # so attn_implementation="tz_softmax" works at load time
    register(_kernel)
