"""``swap_attention``: replace every ``nn.MultiheadAttention`` in a model, weights kept.

Walks ``model.named_modules()``, builds a ``MultiheadAttentionCompat`` (``torch.py``) for each
target with its weights, device, dtype, mode and hooks, keeps shared modules shared, and takes every
``nn.TransformerEncoder`` it touches off the nested-tensor path (which would bypass it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

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


def swap_attention(
    model: nn.Module,
    attention: AttentionFactory,
    *,
    where: Callable[[str, nn.MultiheadAttention], bool] | None = None,
) -> SwapReport:
    """Replace every ``nn.MultiheadAttention`` in ``model`` (in place) by a compat module.

    Args:
        model: any module; self- and cross-attention are both replaced.
        attention: the ``MultiHeadAttention`` subclass or factory (see
            ``MultiheadAttentionCompat``), e.g. ``SoftmaxAttention`` or
            ``functools.partial(PerformerAttention, nb_features=256)``.
        where: optional filter ``where(path, module) -> bool``; only modules it accepts are
            replaced.

    Each replacement keeps the weights, device, dtype and train/eval mode, and takes over the
    original's hooks (forward, pre-forward, with or without kwargs, backward, state_dict):
    they fire on the replacement with the same call and output, and their handles still
    remove them. State-dict hooks see the replacement's keys (``attention.q_proj.weight``,
    ...), not ``in_proj_weight``. Every
    ``nn.TransformerEncoder`` that contains a replaced module gets ``use_nested_tensor = False``:
    its eval-mode nested-tensor path reads ``in_proj_weight`` and would bypass our attention.
    Raises ValueError naming the module path for targets that cannot be swapped.
    """
    report = SwapReport()
    targets = [
        (path, mod) for path, mod in model.named_modules(remove_duplicate=False)
        if isinstance(mod, nn.MultiheadAttention) and (where is None or where(path, mod))
    ]
    built: dict[int, MultiheadAttentionCompat] = {}  # a shared module stays shared
    for path, mha in targets:
        if not path:
            raise ValueError("swap_attention: model is itself an nn.MultiheadAttention; build a "
                             "MultiheadAttentionCompat.from_torch(model, attention) instead")
        parent_path, _, name = path.rpartition(".")
        if id(mha) not in built:
            built[id(mha)] = MultiheadAttentionCompat.from_torch(mha, attention, path=path)
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
