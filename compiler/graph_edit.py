"""GraphEditor: add initializers and nodes to a copy of an ONNX model, rewire consumers, re-sort."""

from __future__ import annotations

import itertools
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper


class GraphEditor:
    """Adds initializers and nodes to a copy of a model and rewires consumers.

    Nodes are appended and the graph is topologically re-sorted by ``finish``.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        self.graph = self.model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self._names = {n.name for n in self.graph.node} | {t for n in self.graph.node for t in n.output}
        self._names |= set(self.inits) | {i.name for i in self.graph.input}
        self._counter = itertools.count()
        self.cache: dict[tuple, str] = {}  # shared results (a weight used by several layers)
        self.qweights: dict[tuple, object] = {}  # qdq.QuantizedWeight per cached weight
        self.domains: set[str] = set()

    def unique(self, base: str) -> str:
        name = base
        while name in self._names:
            name = f"{base}_{next(self._counter)}"
        self._names.add(name)
        return name

    def consumers(self, tensor: str) -> list[onnx.NodeProto]:
        return [n for n in self.graph.node if tensor in n.input]

    def add_initializer(self, base: str, array: np.ndarray) -> str:
        name = self.unique(base)
        t = numpy_helper.from_array(np.asarray(array), name)
        self.graph.initializer.append(t)
        self.inits[name] = t
        return name

    def add_raw_initializer(self, base: str, data_type: int, dims: list[int], raw: bytes) -> str:
        name = self.unique(base)
        t = helper.make_tensor(name, data_type, dims, raw, raw=True)
        self.graph.initializer.append(t)
        self.inits[name] = t
        return name

    def add_node(self, op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs) -> onnx.NodeProto:
        node = helper.make_node(op, inputs, outputs, name=self.unique(name), domain=domain or None, **attrs)
        if domain:
            self.domains.add(domain)
        self.graph.node.append(node)
        return node

    def weight(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def rewire(self, tensor: str, new: str, only: list[onnx.NodeProto] | None = None, skip: tuple[str, ...] = ()) -> None:
        """Make consumers of ``tensor`` (all, or ``only``) read ``new`` instead."""
        targets = only if only is not None else self.graph.node
        for node in targets:
            if node.name in skip:
                continue
            for i, name in enumerate(node.input):
                if name == tensor:
                    node.input[i] = new

    def remove_nodes(self, names: set[str]) -> None:
        keep = [n for n in self.graph.node if n.name not in names]
        del self.graph.node[:]
        self.graph.node.extend(keep)

    def finish(self, min_opset: int = 13) -> onnx.ModelProto:
        """Topologically sort, drop unused initializers, declare the opsets used."""
        _toposort(self.graph)
        used = {i for n in self.graph.node for i in n.input} | {o.name for o in self.graph.output}
        used |= _subgraph_inputs(self.graph)
        keep = [t for t in self.graph.initializer if t.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)
        for op in self.model.opset_import:
            if op.domain in ("", "ai.onnx") and op.version < min_opset:
                op.version = min_opset
        have = {op.domain for op in self.model.opset_import}
        for d in sorted(self.domains - have):
            self.model.opset_import.append(helper.make_opsetid(d, 1))
        return self.model


def _subgraph_inputs(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                names |= {i for n in g.node for i in n.input}
                names |= _subgraph_inputs(g)
    return names


def _toposort(graph: onnx.GraphProto) -> None:
    produced_by: dict[str, int] = {}
    nodes = list(graph.node)
    for i, n in enumerate(nodes):
        for o in n.output:
            produced_by[o] = i
    deps: dict[int, set[int]] = defaultdict(set)
    for i, n in enumerate(nodes):
        needed = set(n.input) | _implicit_inputs(n)
        deps[i] = {produced_by[t] for t in needed if t in produced_by and produced_by[t] != i}
    order: list[int] = []
    state: dict[int, int] = {}
    for start in range(len(nodes)):
        stack = [(start, iter(sorted(deps[start])))]
        if state.get(start):
            continue
        state[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next((d for d in it if not state.get(d)), None)
            if nxt is None:
                stack.pop()
                state[node] = 2
                order.append(node)
            else:
                state[nxt] = 1
                stack.append((nxt, iter(sorted(deps[nxt]))))
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def _implicit_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope tensors a subgraph (If/Loop/Scan body) reads."""
    names: set[str] = set()
    for attr in node.attribute:
        for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            local = {i.name for i in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
            names |= {i for n in g.node for i in n.input if i and i not in local}
            names |= _subgraph_inputs(g) - local
    return names


