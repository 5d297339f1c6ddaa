"""Teacher and student in one forward: build the student attentions, tap their kernel calls.

``convert(model, attention)`` puts a student ``MultiHeadAttention`` (Performer, Nyström, ...)
in every softmax attention layer of ``model``, in place, with the layer's own projections:

- a Hugging Face 5.x ``PreTrainedModel``: ``interop.huggingface.use`` (HF's projections are
  kept; the student, ``module.tz_attention``, holds only its own state and parameters);
- any module holding ``SoftmaxAttention`` (our ``Encoder``, or a model built from our blocks):
  each is replaced by the student built with its options and loaded with its projections;
- a model with ``nn.MultiheadAttention``: ``interop.swap_attention`` (weights copied).

``Tap`` then decides, per kernel call, what each student's ``attend`` returns. Teacher and
student read the *same* q, k, v (after the model's projections, rotary, HF's scaling):

    teacher_l = softmax(q kᵀ/√d + B) v     (``SoftmaxAttention``'s kernel on the layer's flags)
    student_l = Kernel_l(q, k, v)          (the student's own ``attend``)

- ``"student"``: the converted model (student everywhere); also the state outside a ``Tap``;
- ``"teacher"``: the original model (the teacher's kernel everywhere, exact);
- ``"transfer"``: both are computed; the teacher's output is passed on, so every layer sees the
  original model's inputs, and the error of each student against its teacher is recorded
  (with gradients to the student's parameters): attention transfer in one forward, with no
  second copy of the model.

Shapes: q ``(b, h, n, d)``, k/v ``(b, h, m, d)``, outputs ``(b, h, n, d)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from transformer_zoo.attention.multihead import MultiHeadAttention
from transformer_zoo.attention.softmax import SoftmaxAttention
from transformer_zoo.interop.hf_kernels import KERNELS, HFKernel, check_factory
from transformer_zoo.interop.swap import swap_attention
from transformer_zoo.interop.torch import MultiheadAttentionCompat

AttentionSpec = str | HFKernel | Callable[..., MultiHeadAttention]
_PROJECTIONS = ("q_proj", "kv_proj", "out_proj")


@dataclass
class Conversion:
    """What ``convert`` built: one student per attention layer, in model order.

    Attributes:
        kind: ``"huggingface"``, ``"transformer_zoo"`` or ``"nn.MultiheadAttention"``.
        paths: each layer's attention module path in the model.
        students: the student ``MultiHeadAttention`` of each layer.
        modules: the model's attention module of each layer (the HF attention module, the
            ``MultiheadAttentionCompat``, or the student itself): what stage 2 trains by default.
    """

    kind: str
    paths: list[str]
    students: list[MultiHeadAttention]
    modules: list[nn.Module] = field(default_factory=list)

    def new_parameters(self) -> list[list[tuple[str, nn.Parameter]]]:
        """Per layer, ``(name in the model, parameter)`` of the student's *own* parameters:
        neither the copied projections nor the positional encoding (the teacher's)."""
        return [new_parameters(s, f"{prefix}.") for s, prefix in zip(
            self.students, self._student_prefixes(), strict=True)]

    def _student_prefixes(self) -> list[str]:
        if self.kind == "huggingface":
            return [f"{p}.tz_attention" for p in self.paths]
        if self.kind == "nn.MultiheadAttention":
            return [f"{p}.attention" for p in self.paths]
        return list(self.paths)


def new_parameters(student: MultiHeadAttention, prefix: str = "") -> list[tuple[str, nn.Parameter]]:
    """The student's parameters other than its projections and its positional encoding."""
    skip = {id(p) for name in _PROJECTIONS if isinstance(getattr(student, name, None), nn.Module)
            for p in getattr(student, name).parameters()}
    if isinstance(student.positional, nn.Module):
        skip |= {id(p) for p in student.positional.parameters()}
    return [(prefix + name, p) for name, p in student.named_parameters() if id(p) not in skip]


def _factory(attention: AttentionSpec, layer: int) -> Callable[..., MultiHeadAttention]:
    if isinstance(attention, str):
        if attention not in KERNELS:
            raise ValueError(f"attention: expected one of {sorted(KERNELS)}, a "
                             f"MultiHeadAttention subclass or a factory, got {attention!r}")
        return KERNELS[attention]().attention_factory(layer)
    if isinstance(attention, HFKernel):
        return attention.attention_factory(layer)
    return attention


def _is_hf(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # the hf extra is not installed: no HF model can be passed either
        return False
    return isinstance(model, PreTrainedModel)


def _build_like(teacher: SoftmaxAttention, factory: Callable[..., MultiHeadAttention]
                ) -> MultiHeadAttention:
    """The student for ``teacher``: its options, projections, device, dtype and mode."""
    options: dict[str, Any] = dict(dropout=teacher.dropout, causal=teacher.causal,
                                   positional=teacher.positional)
    if teacher.head_dim * teacher.n_heads != teacher.d_model:
        options["head_dim"] = teacher.head_dim
    if teacher.kv_dim != teacher.d_model:
        options["kv_dim"] = teacher.kv_dim
    if teacher.q_proj.bias is None:
        options["bias"] = False
    student = factory(teacher.d_model, teacher.n_heads, **options)
    if not isinstance(student, MultiHeadAttention):
        raise TypeError(f"attention must build a transformer_zoo MultiHeadAttention, got "
                        f"{type(student).__name__}")
    weight = teacher.q_proj.weight
    student = student.to(device=weight.device, dtype=weight.dtype)
    for name in _PROJECTIONS:
        getattr(student, name).load_state_dict(getattr(teacher, name).state_dict())
    return student.train(teacher.training)


def convert(model: nn.Module, attention: AttentionSpec) -> Conversion:
    """Put a student ``attention`` in every softmax attention layer of ``model`` (in place).

    Args:
        model: an HF 5.x ``PreTrainedModel`` running softmax attention, a module holding
            ``SoftmaxAttention`` modules (``Encoder``), or a module with ``nn.MultiheadAttention``.
        attention: a kernel name (``"performer"``, ``"nystrom"``: ``hf_kernels.KERNELS``), an
            ``HFKernel``, or a ``MultiHeadAttention`` subclass / factory, as the bridges take.

    Untrained, the converted model is the zero-shot swap. To reload a trained conversion:
    ``convert`` a fresh copy of the original model with the same ``attention``, then
    ``load_state_dict``. Raises ValueError when no softmax attention layer is found, when the
    model already runs another kernel, and when layers share the student's parameters.
    """
    if isinstance(attention, nn.Module) or not (isinstance(attention, (str, HFKernel))
                                                or callable(attention)):
        check_factory(attention, "attention")
    if _is_hf(model):
        conversion = _convert_hf(model, attention)
    else:
        conversion = _convert_torch(model, attention)
    seen: dict[int, int] = {}
    for layer, params in enumerate(conversion.new_parameters()):
        for name, p in params:
            if seen.setdefault(id(p), layer) != layer:
                raise ValueError(
                    f"attention: layers {seen[id(p)]} and {layer} share the parameter {name}: "
                    "the factory reuses one module (a feature-map instance?) for every layer; "
                    "pass a factory that builds a fresh one per call")
    return conversion


def _convert_hf(model: nn.Module, attention: AttentionSpec) -> Conversion:
    from transformer_zoo.interop import huggingface as hf

    current = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if current.startswith("tz_") and current != "tz_softmax":
        raise ValueError(f"model: runs {current!r}, not softmax attention; linearize the "
                         "original model (set_attn_implementation('sdpa') to go back)")
    paths = hf.use(model, attention)
    modules = [model.get_submodule(p) for p in paths]
    return Conversion("huggingface", paths, [m.tz_attention for m in modules], modules)


def _convert_torch(model: nn.Module, attention: AttentionSpec) -> Conversion:
    ours = [(p, m) for p, m in model.named_modules() if isinstance(m, SoftmaxAttention)]
    torch_targets = any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    if not ours and not torch_targets:
        raise ValueError(f"model: found no softmax attention in {type(model).__name__} (no "
                         "SoftmaxAttention, nn.MultiheadAttention, or Hugging Face model)")
    paths, students, modules = [], [], []
    for layer, (path, teacher) in enumerate(ours):
        if not path:
            raise ValueError("model: is itself a SoftmaxAttention; wrap it in a module")
        student = _build_like(teacher, _factory(attention, layer))
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, student)
        paths.append(path)
        students.append(student)
        modules.append(student)
    if torch_targets:
        if isinstance(attention, HFKernel):
            kernel = attention
            attention = functools.partial(_layer_factory, kernel)
        report = swap_attention(model, attention)
        for path in dict.fromkeys(report.replaced):  # a shared module once
            compat: MultiheadAttentionCompat = model.get_submodule(path)
            paths.append(path)
            students.append(compat.attention)
            modules.append(compat)
    kind = "nn.MultiheadAttention" if torch_targets and not ours else "transformer_zoo"
    return Conversion(kind, paths, students, modules)


def _layer_factory(kernel: HFKernel, *args: Any, **kwargs: Any) -> MultiHeadAttention:
    return kernel.attention_factory(0)(*args, **kwargs)


class StopForward(Exception):
    """Raised by a tap after the last layer it needs (layer-by-layer transfer)."""


def relative_error(student: Tensor, teacher: Tensor, rows: Tensor | None) -> tuple[Tensor, Tensor]:
    """(Σ ‖s − t‖², Σ ‖t‖²) over real query rows (``rows`` ``(b, n)`` True = real, or None);
    their ratio is the relative squared error. Tensors ``(b, h, n, d)``, reduced in fp32."""
    diff = (student.float() - teacher.float()).square().sum((1, 3))  # (b, n)
    ref = teacher.float().square().sum((1, 3))
    if rows is not None:
        diff, ref = diff * rows, ref * rows
    return diff.sum(), ref.sum()


def weights_cross_entropy(student: MultiHeadAttention, q: Tensor, k: Tensor,
                          kwargs: dict[str, Any]) -> Tensor:
    """Hedgehog's loss: −Σ_j A_ij log Â_ij, mean over real query rows, A the softmax weights
    and Â the student's. Weights are read as ``attend(q, k, I)``: any kernel linear in v
    (Performer, Nyström) returns its ``(b, h, n, m)`` weights for identity values."""
    b, h, m = k.shape[0], k.shape[1], k.shape[2]
    eye = torch.eye(m, device=k.device, dtype=k.dtype).expand(b, h, m, m)
    with torch.no_grad():
        target = SoftmaxAttention.attend(student, q, k, eye, **kwargs).float()
    pred = type(student).attend(student, q, k, eye, **kwargs).float().clamp_min(1e-6)
    ce = -(target * pred.log()).sum(-1).mean(1)  # (b, n)
    rows = kwargs.get("query_padding_mask")
    if rows is None:
        return ce.mean()
    return (ce * rows).sum() / rows.sum().clamp_min(1)


class Tap:
    """Per-call choice of teacher / student for every layer of a ``Conversion``.

    Use as a context manager (``with Tap(conversion, "transfer") as tap:``); the students'
    ``attend`` is restored on exit. In ``"transfer"`` mode, ``layers`` limits the recorded
    layers (others pass the teacher on untouched) and ``stop_after`` raises ``StopForward``
    once that layer is recorded. ``terms[l]`` collects ``(Σ err², Σ ref², weights CE or
    None)`` per call; ``clear()`` empties them.
    """

    def __init__(self, conversion: Conversion, mode: str, *, layers: Sequence[int] | None = None,
                 stop_after: int | None = None, weights_loss: bool = False) -> None:
        if mode not in ("student", "teacher", "transfer"):
            raise ValueError(f"mode: expected 'student', 'teacher' or 'transfer', got {mode!r}")
        self.conversion, self.mode, self.weights_loss = conversion, mode, weights_loss
        self.layers = None if layers is None else set(layers)
        self.stop_after = stop_after
        self.terms: list[list[tuple[Tensor, Tensor, Tensor | None]]] = [
            [] for _ in conversion.students]

    def clear(self) -> None:
        for terms in self.terms:
            terms.clear()

    def _attend(self, layer: int, student: MultiHeadAttention, q: Tensor, k: Tensor, v: Tensor,
                **kwargs: Any) -> Tensor:
        if self.mode == "student":
            return type(student).attend(student, q, k, v, **kwargs)
        teacher = SoftmaxAttention.attend(student, q, k, v, **kwargs)  # exact, same q, k, v
        if self.mode == "teacher" or (self.layers is not None and layer not in self.layers):
            return teacher
        out = type(student).attend(student, q, k, v, **kwargs)
        rows = kwargs.get("query_padding_mask")
        err, ref = relative_error(out, teacher.detach(), rows)
        ce = weights_cross_entropy(student, q, k, kwargs) if self.weights_loss else None
        self.terms[layer].append((err, ref, ce))
        if self.stop_after == layer:
            raise StopForward
        return teacher.detach()

    def __enter__(self) -> Tap:
        for layer, student in enumerate(self.conversion.students):
            # instance attributes shadow the class's methods, for this module only
            student.attend = functools.partial(self._attend, layer, student)
            if self.mode != "student":  # a recurrent decode path would bypass attend
                student.attend_cached = functools.partial(MultiHeadAttention.attend_cached,
                                                          student)
        return self

    def __exit__(self, *exc: object) -> None:
        for student in self.conversion.students:
            student.__dict__.pop("attend", None)
            student.__dict__.pop("attend_cached", None)


@contextmanager
def tapped(conversion: Conversion, mode: str, **options: Any) -> Iterator[Tap]:
    """``with tapped(conversion, "teacher"):`` the original model for the block's calls."""
    with Tap(conversion, mode, **options) as tap:
        yield tap
