"""TorchScript is not supported: ``torch.jit.script`` raises our message pointing to export.

TorchScript is in maintenance mode upstream, and these modules use what its frontend cannot
compile (keyword-only arguments, dataclasses, enums, ``from __future__ import annotations``);
left alone it fails deep inside the frontend. ``torch.export.export`` captures the same modules
as a graph (``tests/test_reliability_export.py``), and ``torch.compile`` speeds them up.

``torch.jit.script(module)`` calls ``__prepare_scriptable__()`` on the module and on every
submodule before compiling anything, so a class that sets
``__prepare_scriptable__ = refuse_scripting`` stops the call first, also when it sits inside a
foreign model (a swapped ``nn.TransformerEncoder``).
"""

from __future__ import annotations

from torch import nn


def refuse_scripting(self: nn.Module) -> nn.Module:
    """``__prepare_scriptable__`` hook: raise RuntimeError naming ``torch.export``."""
    name, path = type(self).__name__, getattr(self, "path", "")
    where = name + (f" at {path!r}" if path and path != name else "")
    raise RuntimeError(
        f"torch.jit.script: {where} is a transformer_zoo module, which TorchScript cannot "
        "compile (TorchScript is in maintenance mode upstream). Use "
        "torch.export.export(model, args, kwargs) for a graph to save or deploy, or "
        "torch.compile(model) for speed."
    )
