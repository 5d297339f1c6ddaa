"""Two dropout passes in one forward: duplicate the batch, run once, split the output.

    (y₁, y₂) = split(f(concat(x, x)))

Dropout draws an independent mask for every element of the doubled batch, so y₁ and y₂ are
two dropout samples of f(x): the pair R-Drop (Liang et al. 2021, arXiv 2106.14448) and
unsupervised SimCSE (Gao et al. 2021, arXiv 2104.08821) compare; fairseq's R-Drop and the
SimCSE code both do this. It is the same arithmetic as two calls and saves only per-call
overhead (``benchmarks/rdrop_two_pass.py``, results in ``benchmarks/results/rdrop_two_pass.md``:
two calls / one doubled call = 0.89x on one CPU thread, 1.27x with two threads, busy machine).

Every tensor argument (positional or keyword) is concatenated with itself along dim 0; other
arguments pass through unchanged. A tensor shared by the whole batch, such as ``(n,)``
positions, must not be duplicated: bind it in a closure,
``two_pass_forward(lambda x: model(x, positions=pos), x)``.

Exact: with dropout off (``model.eval()`` or p = 0) and no batch-coupled layer such as
BatchNorm in training mode, y₁ = y₂ = f(x), equal to a plain call up to float rounding.
Shapes: each input ``(b, ...)`` -> ``(2b, ...)`` into the model; each output ``(2b, ...)`` ->
two ``(b, ...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor


def _double(x: Any) -> Any:
    return torch.cat((x, x), dim=0) if isinstance(x, Tensor) else x


def _split(out: Any) -> tuple[Any, Any]:
    if isinstance(out, Tensor):
        if out.ndim == 0 or out.shape[0] % 2:
            raise ValueError(
                "two_pass_forward: every output must keep the doubled batch on dim 0, "
                f"got shape {tuple(out.shape)}"
            )
        first, second = out.chunk(2, dim=0)
        return first, second
    if out is None:
        return None, None
    if isinstance(out, (tuple, list)):
        firsts, seconds = zip(*(_split(o) for o in out), strict=True) if out else ((), ())
        if hasattr(out, "_fields"):  # namedtuple
            return type(out)(*firsts), type(out)(*seconds)
        return type(out)(firsts), type(out)(seconds)
    if isinstance(out, Mapping):
        pairs = {k: _split(v) for k, v in out.items()}
        return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
    raise TypeError(
        "two_pass_forward: the model must return a Tensor, a tuple/list or a mapping of "
        f"tensors, got {type(out).__name__}"
    )


def two_pass_forward(model: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """Run ``model`` once on the doubled batch; return the outputs of the two copies.

    Keyword arguments go to ``model`` (it rejects misspelt names itself); tensors among them
    are doubled like positional ones. Outputs may be a tensor or (nested) tuples, lists and
    mappings of tensors; mappings come back as plain dicts.
    """
    if not callable(model):
        raise TypeError(f"model: expected a callable, got {type(model).__name__}")
    out = model(*(_double(a) for a in args), **{k: _double(v) for k, v in kwargs.items()})
    return _split(out)
