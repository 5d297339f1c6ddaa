"""Input validation shared by kernels and modules.

Every check raises ``ValueError`` or ``TypeError`` naming what was expected and what came;
none uses ``assert`` (user input deserves a real error, and ``python -O`` strips asserts).
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_tensor(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def check_rank(x: Tensor, name: str, ndim: int, layout: str) -> None:
    check_tensor(x, name)
    if x.ndim != ndim:
        raise ValueError(
            f"{name}: expected a {ndim}-D tensor {layout}, got shape {tuple(x.shape)}"
        )


def check_nonempty(x: Tensor, name: str, layout: str) -> None:
    """Reject empty batches and zero-length sequences (every dim of ``x`` must be >= 1)."""
    if x.numel() == 0:
        raise ValueError(
            f"{name}: expected a non-empty tensor {layout} (batch and sequence length >= 1), "
            f"got shape {tuple(x.shape)}"
        )


def check_same_device(name: str, x: Tensor, other: str, device: torch.device) -> None:
    if x.device != device:
        raise ValueError(
            f"{name}: expected device {device} (that of {other}), got {x.device}; "
            "move one to the other"
        )


def check_floating(x: Tensor, name: str) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")


def check_param_dtype(x: Tensor, name: str, dtype: torch.dtype) -> None:
    """``x`` is floating and has the parameters' ``dtype``; under autocast any floating dtype
    autocast casts (fp32, fp16, bf16; it leaves float64 alone)."""
    check_floating(x, name)
    if x.dtype == dtype:
        return
    if not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"{name} has dtype {x.dtype} but the parameters are {dtype}; "
            "cast one to the other (or use torch.autocast)"
        )
    if x.dtype == torch.float64:
        raise TypeError(
            f"{name} has dtype {x.dtype} but the parameters are {dtype}, and torch.autocast "
            f"does not cast float64; cast it to {dtype}"
        )


def check_same_dtype(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} and {name_b} must share a dtype, got {a.dtype} and {b.dtype}")


def check_bool_mask(mask: Tensor, name: str) -> None:
    check_tensor(mask, name)
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{name}: expected a boolean mask (True = may attend), got dtype {mask.dtype}"
        )


def check_broadcastable(x: Tensor, name: str, target: tuple[int, ...], legend: str) -> Tensor:
    """``x`` must broadcast to ``target`` without growing it and have at most its rank.

    Standard (trailing-dims) broadcasting: a ``(m,)`` tensor broadcasts over the last axis, a
    0-d tensor over everything. Returns ``x`` as a view with leading singleton dims added up
    to ``len(target)``, so every consumer (SDPA included, which indexes dims -2 and -1) sees
    the full rank; callers that only validate may ignore the result.
    """
    check_tensor(x, name)
    ok = x.ndim <= len(target)
    if ok:
        try:
            ok = torch.broadcast_shapes(tuple(x.shape), target) == target
        except RuntimeError:
            ok = False
    if not ok:
        raise ValueError(
            f"{name}: expected a shape broadcastable to {legend} = {target}, "
            f"got {tuple(x.shape)} (at most {len(target)} dims; trailing dims aligned, each "
            "equal to the target's or 1)"
        )
    return x[(None,) * (len(target) - x.ndim)]


def check_key_padding_mask(mask: Tensor, batch: int, k_len: int, name: str = "mask") -> None:
    check_bool_mask(mask, name)
    if tuple(mask.shape) != (batch, k_len):
        raise ValueError(
            f"{name}: expected a key padding mask of shape (batch, k_len) = "
            f"({batch}, {k_len}) with True = real token, got {tuple(mask.shape)}"
        )


def check_positions(positions: Tensor, batch: int, seq: int, name: str = "positions") -> None:
    check_tensor(positions, name)
    if positions.dtype != torch.int64:
        raise TypeError(f"{name}: expected int64 positions, got dtype {positions.dtype}")
    shape = tuple(positions.shape)
    # Compare element-wise, not via set membership: hashing symbolic sizes under
    # torch.compile would specialise them and force one recompile per sequence length.
    if shape != (seq,) and shape != (batch, seq):
        raise ValueError(
            f"{name}: expected shape (seq,) = ({seq},) or (batch, seq) = ({batch}, {seq}), "
            f"got {shape}"
        )


def check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return value


def check_probability(value: float, name: str) -> float:
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1), got {value}")
    return float(value)
