"""Read a transformers RoPE configuration into ``RotaryEmbedding`` keyword arguments.

Accepted forms: a transformers ``PretrainedConfig`` (its ``rope_parameters``, or
``rope_scaling`` in older versions, plus ``rope_theta``, ``partial_rotary_factor``,
``head_dim`` or ``hidden_size // num_attention_heads``, ``max_position_embeddings``,
``original_max_position_embeddings``); the same as a dict (``config.to_dict()``, a
config.json); or a bare rope-parameters dict (it has ``rope_type`` or ``type``).

HF's rules kept: ``type`` is the old name of ``rope_type``; rotary_dim =
int(head_dim·partial_rotary_factor); yarn / llama3 / longrope default
``original_max_position_embeddings`` to ``max_position_embeddings`` (a top-level
``original_max_position_embeddings`` wins, Phi-3); yarn and longrope default ``factor`` to
max_position_embeddings / original_max_position_embeddings; yarn's beta_fast / beta_slow of
None (or 0) mean 32 / 1; dynamic NTK's L₀ is ``max_position_embeddings``.
Unknown rope types (e.g. ``proportional``, multimodal ``mrope_section``) and unknown keys
raise ValueError naming them; nothing is silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformer_zoo.positional.rope_scaling import (
    DynamicNTKScaling,
    Llama3Scaling,
    LongRoPEScaling,
    YaRNScaling,
)

_COMMON = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
_KEYS: dict[str, set[str]] = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "truncate"},
    "longrope": {"short_factor", "long_factor", "original_max_position_embeddings",
                 "attention_factor", "factor"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor",
               "high_freq_factor"},
}
_TOP_LEVEL = ("rope_theta", "partial_rotary_factor", "head_dim", "hidden_size",
              "num_attention_heads", "max_position_embeddings", "original_max_position_embeddings")


def _split_config(config: object) -> tuple[dict[str, Any], dict[str, Any]]:
    """(rope parameters, top-level fields) from any accepted form."""
    if isinstance(config, Mapping):
        if "rope_type" in config or "type" in config:
            return dict(config), {}
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        top = {k: config[k] for k in _TOP_LEVEL if config.get(k) is not None}
    elif hasattr(config, "rope_parameters") or hasattr(config, "rope_scaling"):
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
        rope = rope or {}
        top = {k: getattr(config, k) for k in _TOP_LEVEL if getattr(config, k, None) is not None}
    else:
        raise TypeError(
            "config: expected a transformers PretrainedConfig, a config dict or a "
            f"rope_parameters dict, got {type(config).__name__}"
        )
    if not isinstance(rope, Mapping):
        raise TypeError(f"rope_parameters: expected a dict, got {type(rope).__name__}")
    if any(isinstance(v, Mapping) for v in rope.values()):
        raise ValueError(
            "rope_parameters: nested per-layer-type parameters "
            f"({sorted(k for k, v in rope.items() if isinstance(v, Mapping))}); pass the dict "
            "of one layer type"
        )
    return dict(rope), top


def rotary_kwargs_from_hf(
    config: object, *, head_dim: int | None = None, max_position_embeddings: int | None = None
) -> dict[str, Any]:
    """``RotaryEmbedding`` keyword arguments (head_dim, rotary_dim, base and the scaling) for
    a transformers RoPE configuration; keyword arguments override the config's fields."""
    rope, top = _split_config(config)
    if "type" in rope and "rope_type" in rope and rope["type"] != rope["rope_type"]:
        raise ValueError(f"rope_parameters: type={rope['type']!r} and "
                         f"rope_type={rope['rope_type']!r} disagree")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _KEYS:
        raise ValueError(
            f"rope_type: expected one of {sorted(_KEYS)}, got {rope_type!r}"
        )
    unknown = set(rope) - _COMMON - _KEYS[rope_type]
    if unknown:
        raise ValueError(
            f"rope_parameters: unknown keys for rope_type={rope_type!r}: {sorted(unknown)}; "
            f"expected a subset of {sorted(_COMMON | _KEYS[rope_type])}"
        )
    if head_dim is None:
        head_dim = top.get("head_dim")
    if head_dim is None and "hidden_size" in top and "num_attention_heads" in top:
        head_dim = top["hidden_size"] // top["num_attention_heads"]
    if head_dim is None:
        raise ValueError("head_dim: not in the config (head_dim, or hidden_size and "
                         "num_attention_heads); pass head_dim=")
    max_pos = max_position_embeddings or top.get("max_position_embeddings")
    base = rope.get("rope_theta", top.get("rope_theta", 10000.0))
    partial = rope.get("partial_rotary_factor", top.get("partial_rotary_factor", 1.0)) or 1.0
    out: dict[str, Any] = {"head_dim": head_dim, "rotary_dim": int(head_dim * partial),
                           "base": base}

    def need(value: Any, name: str) -> Any:
        if value is None:
            raise ValueError(f"rope_type={rope_type!r}: {name} missing (pass it in the config, "
                             "or max_position_embeddings=)")
        return value

    original = top.get("original_max_position_embeddings",
                       rope.get("original_max_position_embeddings", max_pos))
    factor = rope.get("factor")
    if rope_type in ("linear", "dynamic", "llama3"):
        factor = need(factor, "factor")
    if rope_type in ("yarn", "longrope") and factor is None and max_pos and original:
        factor = max_pos / original
    if rope_type == "linear":
        out["interpolation_factor"] = factor
    elif rope_type == "dynamic":
        out["scaling"] = DynamicNTKScaling(
            factor=factor, max_position_embeddings=need(max_pos, "max_position_embeddings"))
    elif rope_type == "yarn":
        out["scaling"] = YaRNScaling(
            factor=need(factor, "factor"),
            original_max_position_embeddings=need(original, "original_max_position_embeddings"),
            beta_fast=rope.get("beta_fast") or 32.0, beta_slow=rope.get("beta_slow") or 1.0,
            mscale=rope.get("mscale"), mscale_all_dim=rope.get("mscale_all_dim"),
            attention_factor=rope.get("attention_factor"),
            truncate=bool(rope.get("truncate", True)))  # HF: a stored None is falsy
    elif rope_type == "llama3":
        out["scaling"] = Llama3Scaling(
            factor=factor, low_freq_factor=need(rope.get("low_freq_factor"), "low_freq_factor"),
            high_freq_factor=need(rope.get("high_freq_factor"), "high_freq_factor"),
            original_max_position_embeddings=need(original, "original_max_position_embeddings"))
    elif rope_type == "longrope":
        out["scaling"] = LongRoPEScaling(
            short_factor=need(rope.get("short_factor"), "short_factor"),
            long_factor=need(rope.get("long_factor"), "long_factor"),
            original_max_position_embeddings=need(original, "original_max_position_embeddings"),
            factor=factor, attention_factor=rope.get("attention_factor"))
    return out
