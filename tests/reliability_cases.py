"""Case tables shared by tests/test_reliability_*.py and benchmarks/reliability_table.py.

Discovery is generic, so coverage grows as blocks land: every exported ``MultiHeadAttention``
subclass, every exported concrete ``PositionalEncoding``, every exported ``nn.Module`` and
every name in ``transformer_zoo.functional.__all__``. Blocks whose construction or call cannot
be guessed from keyword conventions need one line in a table below; a block missing from the
tables FAILS loudly ("add a constructor for X ...") instead of being skipped.

Sizes are tiny on purpose (2 shared CPU cores; torch.compile on CPU is slow).
"""

from __future__ import annotations

import importlib
import inspect
import math
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

import transformer_zoo as tz
from transformer_zoo import (
    Encoder,
    EncoderConfig,
    EncoderLayer,
    FeedForward,
    MultiHeadAttention,
    Place,
    PositionalEncoding,
    SwiGLUFeedForward,
    compat,
)
from transformer_zoo.positional import base as positional_base


@dataclass(frozen=True)
class Sizes:
    d_model: int = 16
    n_heads: int = 2
    head_dim: int = 8
    max_len: int = 64


SMALL = Sizes()
OTHER = Sizes(d_model=24, n_heads=4, head_dim=6, max_len=32)  # "differently configured"

# Sub-packages scanned besides the top level. Interop bridges wrap foreign models (torch's
# nn.MultiheadAttention, HF) and have their own test files.
SKIP_PACKAGES = {"interop"}


def _public_objects() -> dict[str, Any]:
    found: dict[str, Any] = {name: getattr(tz, name) for name in tz.__all__}
    for info in pkgutil.iter_modules(tz.__path__):
        if not info.ispkg or info.name in SKIP_PACKAGES:
            continue
        sub = importlib.import_module(f"transformer_zoo.{info.name}")
        for name in getattr(sub, "__all__", []):
            found.setdefault(name, getattr(sub, name))
    return found


def _sorted(classes: set[type]) -> list[type]:
    return sorted(classes, key=lambda c: c.__name__)


def attention_classes() -> list[type[MultiHeadAttention]]:
    """Every exported MultiHeadAttention subclass (not the base)."""
    return _sorted({
        obj for obj in _public_objects().values()
        if isinstance(obj, type) and issubclass(obj, MultiHeadAttention)
        and obj is not MultiHeadAttention
    })


def encoding_classes() -> list[type[PositionalEncoding]]:
    """Every exported concrete PositionalEncoding (the bases in positional/base.py excluded)."""
    return _sorted({
        obj for obj in _public_objects().values()
        if isinstance(obj, type) and issubclass(obj, PositionalEncoding)
        and obj.__module__ != positional_base.__name__
    })


# ------------------------------------------------------------------------------------------
# attentions: extra constructor options for tiny, fast instances (filtered by signature, so a
# renamed option is ignored rather than breaking the build)
ATTENTION_OPTIONS: dict[str, dict[str, Any]] = {
    "PerformerAttention": {"nb_features": 16},
    "NystromAttention": {"num_landmarks": 4, "conv_kernel": 3},
    # a window shorter than the test sequences: both parts (and the map's parameters) in use
    "HybridWindowAttention": {"window": 3, "nb_features": 16},
}
# options that make random features redraw every training step (DDP redraw check)
REDRAW_OPTIONS: dict[str, dict[str, Any]] = {
    "PerformerAttention": {"redraw_interval": 1},
}


def _accepted(cls: type, options: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in options.items() if k in params}


def attention_factory(cls: type[MultiHeadAttention], **extra: Any) -> Callable[..., Any]:
    """``EncoderConfig.attention``-compatible factory with the tiny options applied."""
    options = {**ATTENTION_OPTIONS.get(cls.__name__, {}), **extra}
    return partial(cls, **_accepted(cls, options))


def make_attention(
    cls: type[MultiHeadAttention],
    s: Sizes = SMALL,
    *,
    positional: PositionalEncoding | None = None,
    causal: bool = False,
    dropout: float = 0.0,
) -> MultiHeadAttention:
    return attention_factory(cls)(
        s.d_model, s.n_heads, dropout=dropout, causal=causal, positional=positional,
        head_dim=s.head_dim,
    )


# ------------------------------------------------------------------------------------------
# positional encodings: constructors the keyword conventions cannot guess
ENCODING_TABLE: dict[str, Callable[[Sizes], PositionalEncoding]] = {
    "LearnedPositionalEncoding": lambda s: tz.LearnedPositionalEncoding(s.max_len, s.d_model),
}

_BY_NAME = {
    "d_model": lambda s, place: s.d_model,
    "head_dim": lambda s, place: s.head_dim,
    "n_heads": lambda s, place: s.n_heads,
    "num_heads": lambda s, place: s.n_heads,
    "heads": lambda s, place: s.n_heads,
    "max_len": lambda s, place: s.max_len,
    "dim": lambda s, place: s.d_model if place is Place.INPUT else s.head_dim,
}


def make_encoding(cls: type[PositionalEncoding], s: Sizes = SMALL) -> PositionalEncoding:
    """Build from the table, else from the keyword conventions; fail loudly otherwise."""
    if cls.__name__ in ENCODING_TABLE:
        return ENCODING_TABLE[cls.__name__](s)
    params = inspect.signature(cls.__init__).parameters.values()
    required = [
        p for p in params
        if p.name != "self" and p.default is p.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    unknown = [p.name for p in required if p.name not in _BY_NAME]
    if unknown:
        raise LookupError(
            f"add a constructor for {cls.__name__} to ENCODING_TABLE in "
            f"tests/reliability_cases.py (required parameters {unknown} follow no convention)"
        )
    kwargs = {p.name: _BY_NAME[p.name](s, cls.place) for p in required}
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise LookupError(
            f"add a constructor for {cls.__name__} to ENCODING_TABLE in "
            f"tests/reliability_cases.py ({cls.__name__}(**{kwargs}) raised {err})"
        ) from err


def compatible(att: type[MultiHeadAttention], enc: type[PositionalEncoding] | None) -> bool:
    return enc is None or compat.supports(att, enc)


def pairs() -> list[tuple[type[MultiHeadAttention], type[PositionalEncoding] | None]]:
    """Every attention × (no encoding or a compatible encoding)."""
    return [
        (a, e) for a in attention_classes() for e in [None, *encoding_classes()]
        if compatible(a, e)
    ]


def pair_id(pair: tuple[type, type | None]) -> str:
    a, e = pair
    return f"{a.__name__}-{e.__name__ if e else 'none'}"


def encoder_config(
    att: type[MultiHeadAttention],
    enc: type[PositionalEncoding] | None,
    s: Sizes = SMALL,
    **overrides: Any,
) -> EncoderConfig:
    options = dict(
        d_model=s.d_model, n_heads=s.n_heads, n_layers=2, d_ff=2 * s.d_model, dropout=0.0,
        attention=attention_factory(att),
        positional=None if enc is None else (lambda: make_encoding(enc, s)),
    )
    options.update(overrides)
    return EncoderConfig(**options)


# ------------------------------------------------------------------------------------------
# running a module on deterministic inputs (serialization, meta-device checks)
def _gen(seed: int = 0) -> torch.Generator:
    """On torch's default device (the suite's ``--device``), where the tensors it draws go."""
    return torch.Generator(device=torch.get_default_device()).manual_seed(seed)


def padding_mask(b: int, n: int, g: torch.Generator) -> Tensor:
    """(b, n) True = real token; the first sample has no padding, the others random tails."""
    lengths = torch.randint(1, n + 1, (b,), generator=g)
    lengths[0] = n
    return torch.arange(n)[None, :] < lengths[:, None]


def run_attention(m: MultiHeadAttention, s: Sizes = SMALL, seed: int = 0) -> Tensor:
    g = _gen(seed)
    x = torch.randn(2, 5, s.d_model, generator=g)
    return m(x, mask=padding_mask(2, 5, g))


def run_encoding(pe: PositionalEncoding, s: Sizes = SMALL, seed: int = 0) -> Tensor:
    g = _gen(seed)
    n = 5
    pos = torch.arange(n) + 3
    if pe.place is Place.INPUT:
        return pe(pos)
    q = torch.randn(2, s.n_heads, n, s.head_dim, generator=g)
    k = torch.randn(2, s.n_heads, n, s.head_dim, generator=g)
    if pe.place is Place.QK:
        return torch.cat(pe(q, k, pos, pos), dim=-1)
    bias = pe(q, pos, pos, k=k) if getattr(pe, "needs_keys", False) else pe(q, pos, pos)
    if getattr(pe, "has_value_term", False):
        w = torch.softmax(torch.randn(2, s.n_heads, n, n, generator=g), dim=-1)
        return torch.cat([bias.expand(2, s.n_heads, n, n), pe.value_term(w, pos, pos)], -1)
    return bias


def run_encoder(m: Encoder, s: Sizes = SMALL, seed: int = 0) -> Tensor:
    g = _gen(seed)
    x = torch.randn(2, 5, s.d_model, generator=g)
    return m(x, mask=padding_mask(2, 5, g))


@dataclass(frozen=True)
class ModuleCase:
    """How to build (in the standard or the ``OTHER`` sizes) and run one exported module.

    ``meta_build`` (default ``build``) is what runs under ``torch.device("meta")``: modules
    whose state is fitted to data rather than initialised (Whitening) build unfitted there,
    and ``initialised=False`` says ``reset_parameters`` is not expected to fill their state
    (it comes from a checkpoint).
    """

    build: Callable[[Sizes], nn.Module]
    run: Callable[[nn.Module, Sizes], Tensor]
    meta_build: Callable[[Sizes], nn.Module] | None = None
    initialised: bool = True


def _x(s: Sizes, seed: int = 0) -> Tensor:
    return torch.randn(2, 5, s.d_model, generator=_gen(seed))


MODULE_TABLE: dict[str, ModuleCase] = {
    "Encoder": ModuleCase(
        lambda s: Encoder(encoder_config(tz.SoftmaxAttention, None, s)), run_encoder
    ),
    "EncoderLayer": ModuleCase(
        lambda s: EncoderLayer(encoder_config(tz.SoftmaxAttention, None, s), None),
        lambda m, s: m(_x(s), mask=None, positions=torch.arange(5)),
    ),
    "FeedForward": ModuleCase(lambda s: FeedForward(s.d_model, 2 * s.d_model),
                              lambda m, s: m(_x(s))),
    "DebertaRelativeEmbeddings": ModuleCase(
        lambda s: tz.DebertaRelativeEmbeddings(d_model=s.d_model, position_buckets=8,
                                               max_relative_positions=s.max_len,
                                               layer_norm=True),
        lambda m, s: m(),
    ),
    "SwiGLUFeedForward": ModuleCase(lambda s: SwiGLUFeedForward(s.d_model, 2 * s.d_model),
                                    lambda m, s: m(_x(s))),
}

def _fitted_whitening(s: Sizes) -> nn.Module:
    data = torch.randn(64, s.d_model) @ torch.randn(s.d_model, s.d_model)  # global RNG
    return tz.Whitening(n_components=s.head_dim).fit(data)


def _logits_loss(m: nn.Module, s: Sizes) -> Tensor:
    g = _gen(0)
    p, q = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    return m(p, q, torch.randint(0, 5, (4,), generator=g))


def _views_loss(m: nn.Module, s: Sizes) -> Tensor:
    g = _gen(0)
    return m(torch.randn(4, s.d_model, generator=g), torch.randn(4, s.d_model, generator=g))


if hasattr(tz, "Whitening"):
    MODULE_TABLE["Whitening"] = ModuleCase(
        _fitted_whitening, lambda m, s: m(_x(s)),
        meta_build=lambda s: tz.Whitening(n_components=s.head_dim), initialised=False,
    )
if hasattr(tz, "RDropLoss"):
    MODULE_TABLE["RDropLoss"] = ModuleCase(
        lambda s: tz.RDropLoss(s.head_dim / 8, nn.CrossEntropyLoss()), _logits_loss
    )
if hasattr(tz, "SimCSELoss"):
    MODULE_TABLE["SimCSELoss"] = ModuleCase(
        lambda s: tz.SimCSELoss(temperature=0.05 * s.head_dim / 8), _views_loss
    )


def _feature_map_run(m: nn.Module, s: Sizes) -> Tensor:
    x_hat = torch.randn(2, s.n_heads, 5, s.head_dim, generator=_gen(0))
    return m(x_hat, None, query=False)


# learnable feature maps (attention/learned_feature_maps.py), built at the attention's sizes
def _feature_map_build(name: str, **options: Any) -> Callable[[Sizes], nn.Module]:
    def build(s: Sizes) -> nn.Module:
        return getattr(tz, name)(n_heads=s.n_heads, head_dim=s.head_dim, **options,
                                 projection=tz.functional.draw_projection(12, s.head_dim, seed=0))
    return build


for _name, _opts in {"HedgehogFeatures": {}, "T2RFeatures": {"feature_dim": 12},
                     "LearnedPositiveFeatures": {}}.items():
    if hasattr(tz, _name):
        MODULE_TABLE[_name] = ModuleCase(_feature_map_build(_name, **_opts), _feature_map_run)

ABSTRACT = {"MultiHeadAttention", "PositionalEncoding", "InputEncoding", "QKTransform",
            "LogitBias", "LearnedFeatureMap"}


def module_classes() -> list[type[nn.Module]]:
    return _sorted({
        obj for obj in _public_objects().values()
        if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__name__ not in ABSTRACT
    })


def module_case(cls: type[nn.Module]) -> ModuleCase:
    if issubclass(cls, MultiHeadAttention):
        return ModuleCase(lambda s: make_attention(cls, s), run_attention)
    if issubclass(cls, PositionalEncoding):
        return ModuleCase(lambda s: make_encoding(cls, s), run_encoding)
    if cls.__name__ in MODULE_TABLE:
        return MODULE_TABLE[cls.__name__]
    raise LookupError(
        f"add a constructor for {cls.__name__} to MODULE_TABLE in tests/reliability_cases.py "
        "(how to build it and run it on deterministic inputs)"
    )


def reset_all(module: nn.Module) -> None:
    """Re-initialise after ``to_empty``: every submodule's ``reset_parameters``."""
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()


# ------------------------------------------------------------------------------------------
# kernels in transformer_zoo.functional: how to call each
@dataclass(frozen=True)
class KernelCase:
    """``example()`` gives (args, kwargs) for a compile check. Attention kernels also give
    ``attend(q, k, v, key_padding_mask, causal) -> out`` for the mixed-precision sweep."""

    example: Callable[[], tuple[tuple, dict]]
    attend: Callable[..., Tensor] | None = None
    supports_causal: bool = True


def _qkv(b: int = 2, h: int = 2, n: int = 6, m: int = 6, d: int = 8):
    g = _gen(1)
    return (torch.randn(b, h, n, d, generator=g), torch.randn(b, h, m, d, generator=g),
            torch.randn(b, h, m, d, generator=g))


def _gaussians():
    """Two batches of 3-D Gaussians with SPD covariances."""
    g = _gen(3)
    a, b = torch.randn(2, 3, 3, generator=g), torch.randn(2, 3, 3, generator=g)
    eye = torch.eye(3)
    return (torch.randn(2, 3, generator=g), a @ a.mT + eye, torch.randn(2, 3, generator=g),
            b @ b.mT + eye), {}


def _projection(d: int = 8, nb_features: int = 16) -> Tensor:
    return tz.functional.draw_projection(nb_features, d, seed=7)


def _softmax_attend(fn: Callable, q, k, v, key_padding_mask, causal):
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    out = fn(q, k, v, mask=mask, causal=causal)
    return out[0] if isinstance(out, tuple) else out


def _f(name: str) -> Callable:
    return getattr(tz.functional, name)


def _softmax_example(name: str):
    q, k, v = _qkv()
    mask = padding_mask(2, 6, _gen(2))[:, None, None, :]
    return (q, k, v), dict(mask=mask, bias=torch.randn(1, 2, 6, 6), causal=True)


KERNEL_TABLE: dict[str, KernelCase | str] = {
    "softmax_attention": KernelCase(
        lambda: _softmax_example("softmax_attention"),
        lambda *a: _softmax_attend(_f("softmax_attention"), *a),
    ),
    "explicit_softmax_attention": KernelCase(
        lambda: _softmax_example("explicit_softmax_attention"),
        lambda *a: _softmax_attend(_f("explicit_softmax_attention"), *a),
    ),
    "blockwise_softmax_attention": KernelCase(
        lambda: ((_qkv()), dict(mask=padding_mask(2, 6, _gen(2))[:, None, None, :],
                                bias=torch.randn(1, 2, 6, 6), causal=True, block_size=4)),
        lambda *a: _softmax_attend(_f("blockwise_softmax_attention"), *a),
    ),
    "flex_softmax_attention": "FlexAttention (torch.nn.attention): CPU forward only, an "
                              "unfused reference; tests/test_flex.py",
    "position_at": "an index helper for FlexAttention score_mods; tests/test_flex.py",
    "causal_mask": KernelCase(lambda: ((5, 7), {})),
    "padding_to_attn_mask": KernelCase(lambda: ((padding_mask(2, 6, _gen(2)),), {})),
    "merge_masks": KernelCase(
        lambda: ((padding_mask(2, 6, _gen(2))[:, None, None, :], torch.ones(6, 6).bool()), {})
    ),
    "sinusoidal_encoding": KernelCase(lambda: ((torch.arange(7), 16), {})),
    "RotaryLayout": "an enum naming the rotary layouts",
    "alibi_slopes": KernelCase(lambda: ((6,), {})),
    "alibi_bias": KernelCase(
        lambda: ((tz.functional.alibi_slopes(2), torch.arange(5) + 3, torch.arange(7)),
                 dict(causal=True))
    ),
    "relative_positions": KernelCase(lambda: ((torch.arange(5), torch.arange(7) + 2), {})),
    "shaw_relative_index": KernelCase(lambda: ((torch.arange(5), torch.arange(7), 3), {})),
    "t5_relative_bucket": KernelCase(
        lambda: ((torch.arange(-200, 200, 7),), dict(causal=False, num_buckets=32))
    ),
    "rotary_frequencies": KernelCase(lambda: ((8,), dict(base=500.0))),
    # RoPE length extension: Python numbers in, frequencies/factors out (no tensor input);
    # used through RotaryEmbedding(scaling=...), which the encoding cases cover
    "yarn_frequencies": "frequency constructor from Python numbers (RotaryEmbedding scaling)",
    "llama3_frequencies": "frequency constructor from Python numbers (RotaryEmbedding scaling)",
    "longrope_frequencies": "frequency constructor from Python numbers (RotaryEmbedding "
    "scaling)",
    "dynamic_ntk_base": "a float from Python numbers (RotaryEmbedding scaling)",
    "yarn_attention_factor": "a float from Python numbers (RotaryEmbedding scaling)",
    "longrope_attention_factor": "a float from Python numbers (RotaryEmbedding scaling)",
    "rotary_angles": KernelCase(
        lambda: ((torch.arange(6) + 4090, tz.functional.rotary_frequencies(8)),
                 dict(interpolation_factor=2.0))
    ),
    "apply_rotary": KernelCase(
        lambda: ((_qkv()[0], torch.arange(6) + 4090), dict(dim=6, ntk_factor=2.0))
    ),
    "apply_rotary_angles": KernelCase(
        lambda: ((_qkv()[0], tz.functional.rotary_angles(torch.arange(6),
                                                         tz.functional.rotary_frequencies(8))),
                 dict(layout=tz.functional.RotaryLayout.HALF_SPLIT))
    ),
    "deberta_log_bucket": KernelCase(
        lambda: ((torch.arange(-600, 600, 7),),
                 dict(position_buckets=256, max_relative_positions=512))
    ),
    "deberta_relative_positions": KernelCase(
        lambda: ((torch.arange(5) + 3, torch.arange(7)),
                 dict(position_buckets=8, max_relative_positions=16))
    ),
    "deberta_position_index": KernelCase(lambda: ((torch.arange(-20, 20), 8), {})),
    "disentangled_bias": KernelCase(
        lambda: ((_qkv(m=7)[0], _qkv(m=7)[1],
                  tz.functional.deberta_position_index(
                      tz.functional.deberta_relative_positions(torch.arange(6), torch.arange(7)),
                      4)),
                 dict(pos_key=torch.randn(2, 8, 8, generator=_gen(4)),
                      pos_query=torch.randn(2, 8, 8, generator=_gen(5)), scale=0.2))
    ),
    "t5_bucket_lookup": KernelCase(
        lambda: ((torch.arange(-200, 200, 7),), dict(causal=True, num_buckets=32))
    ),
    "relative_distance_table": KernelCase(
        lambda: ((torch.arange(5) + 3, torch.arange(8)), dict(clamp_len=6))
    ),
    "transformer_xl_sinusoid": KernelCase(lambda: ((torch.arange(-6, 7), 16), {})),
    "transformer_xl_bias": KernelCase(
        lambda: ((_qkv(m=8)[0], _qkv(m=8)[1]),
                 dict(u=torch.randn(2, 8), v=torch.randn(2, 8), r_weight=torch.randn(16, 12),
                      q_positions=torch.arange(6) + 2, k_positions=torch.arange(8)))
    ),
    "gaussian_kl": KernelCase(lambda: _gaussians()),
    "gaussian_bhattacharyya": KernelCase(lambda: _gaussians()),
    "gaussian_wasserstein2": KernelCase(lambda: _gaussians()),
    "symmetric_kl": KernelCase(
        lambda: ((torch.randn(2, 6, 7), torch.randn(2, 6, 7)),
                 dict(mask=padding_mask(2, 6, _gen(2))))
    ),
    "rdrop_mse": KernelCase(
        lambda: ((torch.randn(2, 6), torch.randn(2, 6)),
                 dict(mask=padding_mask(2, 6, _gen(2))))
    ),
    "simcse_logits": KernelCase(lambda: ((torch.randn(4, 8), torch.randn(4, 8)), {})),
    "simcse_loss": KernelCase(
        lambda: ((torch.randn(4, 8), torch.randn(4, 8)), dict(symmetric=True))
    ),
    # Performer (FAVOR+); W from draw_projection, a fixed seed
    "favor_attention": KernelCase(
        lambda: (_qkv() + (_projection(),),
                 dict(causal=True, key_padding_mask=padding_mask(2, 6, _gen(2)),
                      chunk_size=4)),
        lambda q, k, v, kpm, causal: _f("favor_attention")(
            q, k, v, _projection(q.shape[-1]), causal=causal, key_padding_mask=kpm,
            chunk_size=4),
    ),
    # LoLCATs' hybrid: window 3 (keys inside and outside it at n = 6), a fixed W, FAVOR+'s map
    "hybrid_window_attention": KernelCase(
        lambda: (_qkv() + (_projection(), torch.zeros(2)),
                 dict(window=3, feature_map=tz.PositiveFeatures(), causal=True,
                      key_padding_mask=padding_mask(2, 6, _gen(2)), chunk_size=4)),
        lambda q, k, v, kpm, causal: _f("hybrid_window_attention")(
            q, k, v, _projection(q.shape[-1]), torch.zeros(q.shape[1]), window=3,
            feature_map=tz.PositiveFeatures(), causal=causal, key_padding_mask=kpm,
            chunk_size=4),
    ),
    "favor_features": KernelCase(
        lambda: ((*_qkv()[:2], _projection()),
                 dict(causal=True, key_padding_mask=padding_mask(2, 6, _gen(2))))
    ),
    "favor_decode_step": KernelCase(
        lambda: (tuple(t[:, :, :1] for t in _qkv()) + (_projection(),), {})
    ),
    "favor_prefill": KernelCase(
        lambda: (_qkv() + (_projection(),), dict(key_padding_mask=padding_mask(2, 6, _gen(2))))
    ),
    "causal_linear_scan": KernelCase(
        lambda: ((torch.rand(2, 2, 6, 5), torch.rand(2, 2, 6, 5), torch.randn(2, 2, 6, 3),
                  torch.linspace(0, 1, 6).expand(2, 2, 6).contiguous()), dict(chunk=4))
    ),
    "draw_projection": "random-matrix constructor (seeded torch.Generator); runs at init and "
    "redraw, outside forward",
    "gaussian_orthogonal_matrix": "random-matrix constructor (see draw_projection)",
    "FavorState": "a dataclass holding the decoding state",
    "RowNorms": "an enum of row-norm choices",
    "FeatureMap": "feature-map base class; compiled through favor_attention",
    "PositiveFeatures": "feature map; compiled through favor_attention",
    "HyperbolicFeatures": "feature map; compiled through favor_attention",
    "GeneralizedFeatures": "feature map; compiled through favor_attention",
    "OptimalPositiveFeatures": "feature map (FAVOR++); favor_attention with it compiles "
    "fullgraph: tests/test_favor_optimal.py",
    # Nyström; 4 landmarks so that n = 6..9 takes the approximate path
    "nystrom_attention": KernelCase(
        lambda: (_qkv(), dict(num_landmarks=4, key_padding_mask=padding_mask(2, 6, _gen(2)),
                              query_padding_mask=padding_mask(2, 6, _gen(2)))),
        lambda q, k, v, kpm, causal: _f("nystrom_attention")(
            q, k, v, num_landmarks=4, key_padding_mask=kpm),
        supports_causal=False,
    ),
    "iterative_pinv": KernelCase(lambda: ((torch.randn(2, 2, 4, 4).softmax(-1),), {})),
    "regularized_pinv": KernelCase(
        lambda: ((torch.randn(2, 2, 4, 4).softmax(-1),), dict(ridge=0.1))),
    "pinv_init": KernelCase(lambda: ((torch.randn(2, 2, 4, 4).softmax(-1),), {})),
    "segment_ids": KernelCase(lambda: ((padding_mask(2, 6, _gen(2)), 2, 6, 4,
                                        torch.device("cpu")), {})),
    "segment_means": KernelCase(
        lambda: ((_qkv()[0], *_f("segment_ids")(padding_mask(2, 6, _gen(2)), 2, 6, 4,
                                               torch.device("cpu"))), {})
    ),
    "NystromFactors": "a NamedTuple of the factors nystrom_attention can return",
    "permute_rotary_weight": KernelCase(
        lambda: ((torch.randn(16, 16),), dict(
            n_heads=2, head_dim=8, source=tz.functional.RotaryLayout.INTERLEAVED,
            target=tz.functional.RotaryLayout.HALF_SPLIT))
    ),
}


def kernel_names() -> list[str]:
    """Exported functional names, minus those the table marks as not tensor kernels (a str);
    names missing from the table stay in, so their test fails loudly."""
    return sorted(n for n in tz.functional.__all__ if not isinstance(KERNEL_TABLE.get(n), str))


def kernel_case(name: str) -> KernelCase | str:
    """The case, or a string saying why this exported name is not a tensor kernel."""
    if name not in KERNEL_TABLE:
        raise LookupError(
            f"add a call for functional.{name} to KERNEL_TABLE in tests/reliability_cases.py "
            "(example inputs; and attend() if it is an attention kernel)"
        )
    return KERNEL_TABLE[name]


def attention_kernels() -> list[str]:
    """Kernels with an ``attend`` entry (unknown names are reported by the compile test)."""
    return [n for n in kernel_names() if isinstance(KERNEL_TABLE.get(n), KernelCase)
            and KERNEL_TABLE[n].attend is not None]


def scale_qk_projections(m: MultiHeadAttention, q_norm: float, k_norm: float) -> None:
    """Rescale q/k projections so per-head |q|, |k| are about q_norm, k_norm for x ~ N(0, I)."""
    with torch.no_grad():
        inner = m.n_heads * m.head_dim
        for w, target in ((m.q_proj.weight, q_norm), (m.kv_proj.weight[:inner], k_norm)):
            w.normal_(0.0, 1.0 / math.sqrt(m.head_dim * w.shape[1])).mul_(target)
        for b in (m.q_proj.bias, m.kv_proj.bias):
            if b is not None:
                b.zero_()


__all__ = [
    "OTHER", "SMALL", "KernelCase", "ModuleCase", "Sizes", "attention_classes",
    "attention_factory", "attention_kernels", "compatible", "encoder_config",
    "encoding_classes", "kernel_case", "kernel_names", "make_attention", "make_encoding",
    "module_case", "module_classes", "pair_id", "pairs", "padding_mask", "replace",
    "reset_all", "run_attention", "run_encoder", "run_encoding", "scale_qk_projections",
]
