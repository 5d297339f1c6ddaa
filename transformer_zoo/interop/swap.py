"""``swap_attention``: replace every ``nn.MultiheadAttention`` in a model, weights kept.

Walks ``model.named_modules()``, builds a ``MultiheadAttentionCompat`` (``torch.py``) for each
target with its weights, device, dtype, mode and hooks, keeps shared modules shared, and takes every
``nn.TransformerEncoder`` it touches off the nested-tensor path (which would bypass it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from transformer_zoo.interop.hf_kernels import KERNELS, check_factory
from transformer_zoo.interop.torch import AttentionFactory, MultiheadAttentionCompat


@dataclass
class SwapReport:
    """What ``swap_attention`` did: replaced module paths and encoders taken off nested tensors."""

    replaced: list[str] = field(default_factory=list)
    nested_tensor_disabled: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)} nn.MultiheadAttention module(s):"]
        lines += [f"  {p}" for p in self.replaced]
        lines += [f"  nested-tensor fast path disabled on {p}" for p in self.nested_tensor_disabled]
        return "\n".join(lines)


# Every per-module hook table of nn.Module (torch 2.x): forward, pre-forward (and their kwargs
# and always-called flags), backward, state_dict and load_state_dict hooks.
_HOOK_TABLES = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
    "_backward_pre_hooks", "_is_full_backward_hook", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def _move_hooks(source: nn.Module, target: nn.Module) -> None:
    """Hand ``source``'s hook tables to ``target`` (the same dicts: handles still remove)."""
    fresh = nn.Module()
    for table in _HOOK_TABLES:
        if table in vars(source):
            setattr(target, table, vars(source)[table])
            setattr(source, table, getattr(fresh, table))


def _factories(attention: str | AttentionFactory, options: dict[str, Any]
               ) -> Callable[[int], AttentionFactory]:
    """``layer -> factory``: a kernel name with its options, or one class/factory for all."""
    if isinstance(attention, str):
        if attention not in KERNELS:
            raise ValueError(f"attention: expected one of {sorted(KERNELS)}, a "
                             f"MultiHeadAttention subclass or a factory, got {attention!r}")
        return KERNELS[attention](**options).attention_factory  # typos raise TypeError
    if options:
        raise TypeError(f"options {sorted(options)} go with a kernel name; with "
                        f"{getattr(attention, '__name__', type(attention).__name__)} use "
                        "functools.partial")
    check_factory(attention, "attention")
    return lambda layer: attention


def swap_attention(
    model: nn.Module,
    attention: str | AttentionFactory,
    *,
    where: Callable[[str, nn.MultiheadAttention], bool] | None = None,
    **options: Any,
) -> SwapReport:
    """Replace every ``nn.MultiheadAttention`` in ``model`` (in place) by a compat module.

    Args:
        model: any module; self- and cross-attention are both replaced.
        attention: a kernel name shared with ``huggingface.use`` (``"softmax"``,
            ``"performer"``, ``"nystrom"``: ``hf_kernels.KERNELS``, same defaults), or the
            ``MultiHeadAttention`` subclass or factory (see ``MultiheadAttentionCompat``), e.g.
            ``SoftmaxAttention`` or ``functools.partial(PerformerAttention, nb_features=256)``.
        where: optional filter ``where(path, module) -> bool``; only modules it accepts are
            replaced.
        **options: the named kernel's options (fields of its dataclass; typos raise
            TypeError), e.g. ``swap_attention(model, "performer", nb_features=64, seed=0)``.
            Named Performer layers get ``layer = 0, 1, ...`` in replacement order.

    Each replacement keeps the weights, device, dtype and train/eval mode, and takes over the
    original's hooks (forward, pre-forward, with or without kwargs, backward, state_dict):
    they fire on the replacement with the same call and output, and their handles still
    remove them. State-dict hooks see the replacement's keys (``attention.q_proj.weight``,
    ...), not ``in_proj_weight``. Every
    ``nn.TransformerEncoder`` that contains a replaced module gets ``use_nested_tensor = False``:
    its eval-mode nested-tensor path reads ``in_proj_weight`` and would bypass our attention.
    Raises TypeError for a module instance as ``attention``; ValueError when nothing is left
    to replace, and naming the module path for targets that cannot be swapped.
    """
    factory_for = _factories(attention, options)
    report = SwapReport()
    targets = [
        (path, mod) for path, mod in model.named_modules(remove_duplicate=False)
        if isinstance(mod, nn.MultiheadAttention) and (where is None or where(path, mod))
    ]
    if not targets:
        found = sum(isinstance(mod, nn.MultiheadAttention) for mod in model.modules())
        done = sum(isinstance(mod, MultiheadAttentionCompat) for mod in model.modules())
        why = (f"where= rejected all {found}" if found else
               f"it holds {done} MultiheadAttentionCompat already (swapped before?)" if done
               else "it has none")
        raise ValueError(f"swap_attention: no nn.MultiheadAttention to replace in "
                         f"{type(model).__name__}: {why}")
    built: dict[int, MultiheadAttentionCompat] = {}  # a shared module stays shared
    for path, mha in targets:
        if not path:
            raise ValueError("swap_attention: model is itself an nn.MultiheadAttention; build a "
                             "MultiheadAttentionCompat.from_torch(model, attention) instead")
        parent_path, _, name = path.rpartition(".")
        if id(mha) not in built:
            factory = factory_for(len(built))
            built[id(mha)] = MultiheadAttentionCompat.from_torch(mha, factory, path=path)
            _move_hooks(mha, built[id(mha)])
        setattr(model.get_submodule(parent_path), name, built[id(mha)])
        report.replaced.append(path)
    for path, mod in model.named_modules():
        if isinstance(mod, nn.TransformerEncoder) and any(
            isinstance(sub, MultiheadAttentionCompat) for sub in mod.modules()
        ):
            mod.use_nested_tensor = False
            report.nested_tensor_disabled.append(path or "<model>")
    return report
