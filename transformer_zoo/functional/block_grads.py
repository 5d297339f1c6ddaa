"""Gradients of per-block terms that read shared per-call work, back-propagated once.

A blockwise kernel's bias rows ``rows(i0, i1)`` read tensors built once per call (Transformer-
XL's W_R R table and uᵀk, DeBERTa's P, K^r and its ``(b, h, 2k, m)`` p2c table). Pulling each
block's gradient straight to the leaves would run the backward of that shared work once per
block. Instead each block's gradient stops at the edges where its own graph enters the shared
graph (``torch.autograd.graph.GradientEdge``), the gradients at those edges are summed over the
blocks, and the shared graph is back-propagated once at the end: the same sum, by linearity of
the backward, in one pass. Which nodes are shared is found by two probes of the row function
(the nodes both row blocks reach); a block's graph is walked every time, so an edge the probes
did not see is still followed (to a leaf, or kept as one more edge).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge


def graph_nodes(roots: Iterable[Tensor | None]) -> set:
    """Every autograd node reachable from ``roots``."""
    seen: set = set()
    stack = [r.grad_fn for r in roots if r is not None and r.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(fn for fn, _ in node.next_functions)
    return seen


def shared_nodes(rows: Callable[[int, int], Tensor], n: int) -> set:
    """Nodes that the rows of two different blocks both reach: the per-call work."""
    if n < 2:
        return set()
    return graph_nodes([rows(0, 1)]) & graph_nodes([rows(1, 2)])


def leaf_variables(nodes: Iterable) -> list[Tensor]:
    """The leaf tensors of a set of nodes (their AccumulateGrad nodes' variables)."""
    out, seen = [], set()
    for node in nodes:
        var = getattr(node, "variable", None)
        if var is not None and id(var) not in seen:
            seen.add(id(var))
            out.append(var)
    return out


class BlockGrads:
    """Sum over blocks of the gradients of ``inputs`` (leaves) from per-block terms."""

    def __init__(self, inputs: list[Tensor], shared: set) -> None:
        self.inputs = inputs
        self.shared = shared
        self.values: list[Tensor | None] = [None] * len(inputs)
        self.edges: dict[tuple, Tensor] = {}  # (node, output_nr) -> summed gradient

    def _boundary(self, root: Tensor) -> list[tuple]:
        if root.grad_fn in self.shared:
            return [(root.grad_fn, root.output_nr)]
        found, seen, stack = [], set(), [root.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            for nxt, nr in node.next_functions:
                if nxt is None:
                    continue
                if nxt in self.shared or hasattr(nxt, "variable"):
                    if (nxt, nr) not in found:
                        found.append((nxt, nr))
                else:
                    stack.append(nxt)
        return found

    def _add_leaf(self, var: Tensor, g: Tensor) -> None:
        for i, t in enumerate(self.inputs):
            if t is var:
                self.values[i] = g if self.values[i] is None else self.values[i] + g
                return
        raise RuntimeError("blockwise attention: the bias reads a tensor requiring grad that "
                           "its one-row probe did not reach; please report this")

    def pull(self, outputs: Tensor, grad: Tensor, extra: tuple[Tensor, ...] = ()) -> tuple:
        """Back-propagate ``grad`` from ``outputs`` to the edges into the shared graph (summed)
        and into ``extra`` (returned, e.g. the block's weights for a value term)."""
        if outputs.grad_fn is None:
            return (None,) * len(extra)
        edges = [e for e in self._boundary(outputs)
                 if not any(getattr(e[0], "variable", None) is t for t in extra)]
        # retain_graph: a shared node the probes missed is walked through per block (still
        # exact), so its buffers must outlive this block; the block's own graph dies with it
        got = torch.autograd.grad(outputs, [*extra, *(GradientEdge(*e) for e in edges)], grad,
                                  allow_unused=True, retain_graph=True)
        for edge, g in zip(edges, got[len(extra):], strict=True):
            if g is None:
                continue
            var = getattr(edge[0], "variable", None)
            if var is not None:
                if var.requires_grad:
                    self._add_leaf(var, g)
            elif edge in self.edges:
                self.edges[edge].add_(g)  # our own sum (autograd.grad's fresh output)
            else:
                self.edges[edge] = g.clone() if g is grad else g
        return got[:len(extra)]

    def finish(self) -> list[Tensor | None]:
        """Back-propagate the summed edge gradients through the shared graph once; return the
        inputs' gradients."""
        if self.edges:
            wanted = [i for i, t in enumerate(self.inputs) if t.requires_grad]
            got = torch.autograd.grad([GradientEdge(*e) for e in self.edges],
                                      [self.inputs[i] for i in wanted],
                                      list(self.edges.values()), allow_unused=True,
                                      retain_graph=True)  # an outer retain_graph=True may
            # run this backward again: the shared graph lives as long as the call's context
            for i, g in zip(wanted, got, strict=True):
                if g is not None:
                    self.values[i] = g if self.values[i] is None else self.values[i] + g
            self.edges.clear()
        return self.values
