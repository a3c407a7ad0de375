"""Turn a chain of data-movement ops that rolls or partitions rows into one Gather of whole rows.

Rewrite:
    Y = chain(X)  =>  Y = Reshape(Gather(Reshape(X, [R, C]), rows, axis=0), Y.shape)

where ``chain`` is a connected set of Reshape / Transpose / Slice / Concat / Squeeze / Unsqueeze /
Flatten / Identity / Pad (zero pads) nodes with one non-constant data input ``X``, every value in
it read only inside it (but ``Y``; a value also read elsewhere is where a chain starts), at least
two copy kernels' worth of it (Concats, a Transpose), a product reading ``Y`` or making ``X``
(absorb_row_gather), static shapes, and the last axis (``C`` channels) carried through unchanged: each output row is one input row. ``rows`` (int64,
one per output row) is found by running the chain's own numpy references on an index array
(``X``'s flat index + 1 at every element), then checked: every output element must be its row's
input element at the same channel (a pad, a reordered channel or a mixed row leaves the chain as
it was).

Swin's shifted windows: ``roll`` (two Slices and a Concat per axis) then the window partition
(Reshape, Transpose, Reshape) ran as three copy kernels before the QKV product, and the window
reverse and roll back as three more before the residual Add, in every shifted block; each side is
now a gather, which absorb_row_gather moves into the QKV and output products. Runs after
fold_constants (static shapes, constant slice bounds), before fusion.
"""

from __future__ import annotations

import numpy as np

from rtxjit.ir.graph import Graph, Node
from rtxjit.ir.registry import get_op
from rtxjit.ir.rewrite import FreshNames, is_graph_output, make_constant, make_node, remove_nodes, sort_topologically
from rtxjit.passes.base import PassResult

ENABLED = True  # False: the chains stay as the exporter wrote them (before 2026-12-07), for an A/B
DATA_OPS = ("Reshape", "Transpose", "Slice", "Concat", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Pad")
MAX_ELEMENTS = 1 << 24  # index arrays of the chain's values (int64, 128 MB) evaluated at build time


def fuse_row_gather(graph: Graph) -> PassResult:
    if not ENABLED:
        return PassResult(graph, False)
    names = FreshNames(graph)
    changed = False
    judged: dict = {}  # id -> chain end found not to be a row gather (kept: its id is not reused meanwhile)
    for _ in range(len(graph.nodes)):
        uses = graph.consumers()
        found = None
        for node in graph.nodes:
            if id(node) in judged:
                continue
            region = _region(graph, node, uses)
            if region is not None:
                rows = _rows(*region)
                if rows is not None:
                    found = region, rows
                    break
            judged[id(node)] = node
        if found is None:
            break
        _rewrite(graph, found[0], found[1], names)
        changed = True
    return PassResult(graph, changed)


def _data_inputs(node: Node) -> list:
    """The inputs of a data-movement node that carry data (not shapes, bounds or pads)."""
    return [v for v in node.inputs if v is not None] if node.op == "Concat" else node.inputs[:1]


def _region(graph: Graph, end: Node, uses: dict):
    """``(nodes in graph order, source value X, end node)`` of the chain ending at ``end``, or None."""
    if end.op not in DATA_OPS or len(end.outputs) != 1 or end.outputs[0] is None:
        return None
    y = end.outputs[0]
    readers = [n for n, _ in uses.get(y.name, [])]
    if not is_graph_output(graph, y) and readers and all(n.op in DATA_OPS for n in readers):
        return None  # not the chain's end: it goes on
    members, sources, stack = {id(end): end}, {}, [end]
    while stack:
        node = stack.pop()
        for v in node.inputs[1:] if node.op != "Concat" else []:
            if v is not None and not v.is_const:
                return None  # a run-time shape or bound
        for v in _data_inputs(node):
            if v.is_const:
                return None
            p = v.producer
            inside = (p is not None and p.op in DATA_OPS and len(p.outputs) == 1 and not is_graph_output(graph, v)
                      and all(id(r) in members for r, _ in uses.get(v.name, [])))
            if not inside:  # made elsewhere, or also read elsewhere: the chain starts here
                sources[v.name] = v
            elif id(p) not in members:
                members[id(p)] = p
                stack.append(p)
    if len(sources) != 1:
        return None
    (x,) = sources.values()
    for n in members.values():
        out = n.outputs[0]
        if n is not end and any(id(r) not in members for r, _ in uses.get(out.name, [])):
            return None  # read by a member found after it was judged (a reader reached by another path)
    if n_pads := [n for n in members.values() if n.op == "Pad"]:
        if any(len(n.inputs) < 2 or n.inputs[1] is None or np.any(n.inputs[1].const) for n in n_pads):
            return None
    values = [x] + [n.outputs[0] for n in members.values()]
    if not all(v.type.static and v.type.rank >= 1 for v in values):
        return None
    if x.type.shape[-1] != y.type.shape[-1] or any(int(np.prod(v.type.shape)) > MAX_ELEMENTS for v in values):
        return None
    order = [n for n in graph.nodes if id(n) in members]
    if _copies(order) < 2 and not _feeds_a_product(graph, y, uses) and _product_of(graph, x, uses) is None:
        return None  # one copy kernel either way (a lone roll's Concat is one launch): no gain
    return order, x, end


def _product_of(graph: Graph, x, uses: dict):
    """``(MatMul node, bias Add node or None)`` where ``x`` is ``MatMul(a, w)`` (``w`` 2-D), or that
    plus a bias that broadcasts over the rows, each read only on the way to ``x``: a row gather of
    ``x`` is then the product of gathered rows of ``a`` (``absorb_row_gather``)."""
    node, bias = x.producer, None
    if node is not None and node.op == "Add" and x.type.static:
        for i in (0, 1):
            p, b = node.inputs[i], node.inputs[1 - i]
            if (p.producer is not None and p.producer.op == "MatMul" and b.type.static and p.type.static
                    and p.type.shape == x.type.shape and b.type.rank <= x.type.rank
                    and all(d == 1 for d in b.type.shape[:-1])):
                if len(uses.get(p.name, [])) != 1 or is_graph_output(graph, p):
                    return None
                node, bias = p.producer, node
                break
    if node is None or node.op != "MatMul" or node.inputs[1].type.rank != 2 or node.inputs[0].type.rank < 2:
        return None
    if node.inputs[0] is node.inputs[1] or not node.outputs[0].type.static:
        return None
    return node, bias


def _copies(order: list) -> int:
    """About how many copy kernels the chain runs as it is: one per Concat, one more for a
    Transpose (its Reshape after it needs the data moved)."""
    return sum(n.op == "Concat" for n in order) + any(n.op == "Transpose" for n in order)


def _feeds_a_product(graph: Graph, y, uses: dict) -> bool:
    """Whether ``y``'s readers are MatMuls taking it as ``a`` with a 2-D ``b``: a product can read the
    gathered rows where they are (``absorb_row_gather``)."""
    readers = uses.get(y.name, [])
    if is_graph_output(graph, y) or not readers:
        return False
    # several: the q, k and v projections, one product once merge_parallel_matmuls has run
    return all(r.op == "MatMul" and slot == 0 and r.inputs[1] is not y and r.inputs[1].type.rank == 2
               for r, slot in readers)


def _rows(order: list, x, end: Node):
    """The input row of each output row, or None where the chain is not a row gather."""
    c = x.type.shape[-1]
    env = {x.name: np.arange(1, int(np.prod(x.type.shape)) + 1, dtype=np.int64).reshape(x.type.shape)}
    for node in order:
        opdef = get_op(node.op, f"node '{node.name}'", node.version)
        args = [None if v is None else env[v.name] if v.name in env else v.const for v in node.inputs]
        try:
            (out,) = opdef.run_reference(args, node.attrs, 1)
        except Exception:  # noqa: BLE001 - a reference that cannot run here: leave the chain alone
            return None
        env[node.outputs[0].name] = np.asarray(out)
    y = env[end.outputs[0].name]
    if tuple(y.shape) != tuple(end.outputs[0].type.shape) or y.dtype != np.int64:
        return None
    flat = y.reshape(-1, c) - 1
    rows = flat[:, 0] // c
    if np.any(flat < 0) or not np.array_equal(flat, rows[:, None] * c + np.arange(c)[None, :]):
        return None
    if len(rows) < 2 or len(set(np.diff(rows).tolist())) == 1:
        return None  # rows at one stride: a strided view already reads them, no kernel at all
    return rows


def _rewrite(graph: Graph, region: tuple, rows: np.ndarray, names: FreshNames) -> None:
    order, x, end = region
    y = end.outputs[0]
    c = x.type.shape[-1]
    at = graph.nodes.index(order[0])
    flat = make_node(names, "Reshape", [x, make_constant(names, "row_gather_shape", np.array([-1, c], np.int64))],
                     base="row_gather_in")
    gather = make_node(names, "Gather", [flat.outputs[0], make_constant(names, "row_gather_rows", rows)],
                       {"axis": 0}, base="row_gather")
    shaped = make_node(names, "Reshape", [gather.outputs[0], make_constant(names, "row_gather_out",
                                                                          np.array(y.type.shape, np.int64))],
                       base="row_gather_out")
    shaped.outputs = [y]
    remove_nodes(graph, [n for n in order if n is not end])
    graph.nodes.remove(end)
    y.producer = shaped
    at = min(at, len(graph.nodes))
    graph.nodes[at:at] = [flat, gather, shaped]


def absorb_row_gather(graph: Graph) -> PassResult:
    """``MatMul(Reshape(Gather(data, rows, axis=0)), w)`` => ``rtxjit.RowGatherMatMul(data, rows, w)``
    where ``data`` is ``[R, K]``, ``rows`` a constant 1-D index, ``w`` 2-D and the Gather (and the
    Reshape) read by this product only: the product reads the rows where they are (fuse_row_gather
    made the Gather; runs after merge_parallel_matmuls, before fuse_epilogue, which then fuses the
    bias into it as into any product)."""
    if not ENABLED:
        return PassResult(graph, False)
    names = FreshNames(graph)
    uses = graph.consumers()
    changed = False
    for gather in list(graph.nodes):
        if _gathered_product(graph, gather, uses, names):
            changed = True
            uses = graph.consumers()
    for mm in list(graph.nodes):
        found = _gathered_a(graph, mm, uses)
        if found is None:
            continue
        gather, dead = found
        data, rows = gather.inputs
        a, w = mm.inputs
        fused = make_node(names, "rtxjit.RowGatherMatMul", [data, rows, w], {"shape": tuple(a.type.shape[:-1])},
                          base=mm.name + "_rows")
        fused.name = names(mm.name + "_rows")
        out = mm.outputs[0]
        fused.outputs = [out]
        out.producer = fused
        graph.nodes[graph.nodes.index(mm)] = fused
        remove_nodes(graph, dead)
        changed = True
        uses = graph.consumers()
    return PassResult(graph, changed)


def _gathered_a(graph: Graph, mm: Node, uses: dict):
    """``(Gather node, nodes that go with the rewrite)`` where ``mm`` reads a row gather as ``a``."""
    if mm.op != "MatMul" or mm.inputs[1].type.rank != 2 or mm.inputs[0].type.rank < 2:
        return None
    a = mm.inputs[0]
    dead = []
    node = a.producer
    if node is not None and node.op == "Reshape":
        if len(uses.get(a.name, [])) != 1 or is_graph_output(graph, a):
            return None
        dead.append(node)
        a = node.inputs[0]
        node = a.producer
    if node is None or node.op != "Gather" or node.attrs.get("axis", 0) != 0:
        return None
    data, rows = node.inputs
    if (len(uses.get(a.name, [])) != 1 or is_graph_output(graph, a) or data.type.rank != 2 or not rows.is_const
            or rows.const.ndim != 1 or a.type.shape[-1] != data.type.shape[-1] or not data.type.static):
        return None
    if np.any(rows.const < 0) or np.any(rows.const >= data.type.shape[0]):
        return None  # negative or out-of-range rows: the Gather keeps its own rules
    if rows.const.dtype != np.int64:
        return None
    return node, dead + [node]


def _const_rows(gather: Node, rows_of: int):
    """The Gather's constant int64 row index, all in ``[0, rows_of)``, or None."""
    rows = gather.inputs[1]
    if (gather.op != "Gather" or gather.attrs.get("axis", 0) != 0 or not rows.is_const or rows.const.ndim != 1
            or rows.const.dtype != np.int64 or np.any(rows.const < 0) or np.any(rows.const >= rows_of)):
        return None
    return rows


def _gathered_product(graph: Graph, gather: Node, uses: dict, names: FreshNames) -> bool:
    """``Gather(Reshape(MatMul(a, w) [+ bias]), rows)`` => ``RowGatherMatMul(a2, rows, w) [+ bias]``: a
    row of the product is the product of that row of ``a``, so the product reads ``a``'s rows in the
    gathered order and writes the result where the Gather did (Swin's window reverse and roll back
    after the output projection: no gather kernel; the bias and the residual Add after it join the
    product's epilogue)."""
    if gather.op != "Gather" or gather.inputs[0].type.rank != 2:
        return False
    data = gather.inputs[0]
    dead = [gather]
    x = data
    if x.producer is not None and x.producer.op == "Reshape":
        if len(uses.get(x.name, [])) != 1 or is_graph_output(graph, x):
            return False
        dead.append(x.producer)
        x = x.producer.inputs[0]
    if len(uses.get(x.name, [])) != 1 or is_graph_output(graph, x):
        return False
    found = _product_of(graph, x, uses)
    if found is None:
        return False
    mm, bias = found
    a, w = mm.inputs
    k, n = w.type.shape
    m = int(np.prod(a.type.shape[:-1]))
    if not (a.type.static and w.type.static and isinstance(k, int) and isinstance(n, int)) or data.type.shape != (m, n):
        return False
    rows = _const_rows(gather, m)
    if rows is None:
        return False
    out = gather.outputs[0]
    shape = (len(rows.const),)
    readers = uses.get(out.name, [])
    if len(readers) == 1 and readers[0][0].op == "Reshape" and not is_graph_output(graph, out):
        # the rows reshaped back to the activation's shape: the product writes that shape itself, so the
        # bias Add and the residual Add after it are neighbours (one fused epilogue)
        view = readers[0][0]
        target = view.outputs[0].type.shape
        if (view.outputs[0].type.static and len(target) >= 2 and target[-1] == n
                and int(np.prod(target[:-1])) == len(rows.const)):
            dead.append(view)
            out = view.outputs[0]
            shape = tuple(target[:-1])
    at = graph.nodes.index(gather)
    new = []
    a2 = a
    if a.type.rank != 2:
        flat = make_node(names, "Reshape", [a, make_constant(names, "row_gather_a", np.array([m, k], np.int64))],
                         base="row_gather_a")
        new.append(flat)
        a2 = flat.outputs[0]
    product = make_node(names, "rtxjit.RowGatherMatMul", [a2, rows, w], {"shape": shape}, base=mm.name + "_rows")
    new.append(product)
    last = product
    if bias is not None:
        b = bias.inputs[1] if bias.inputs[0] is mm.outputs[0] else bias.inputs[0]
        add = make_node(names, "Add", [product.outputs[0], b], base=bias.name + "_rows")
        new.append(add)
        last = add
    if last.outputs[0].type != out.type:
        return False
    last.outputs = [out]
    out.producer = last
    remove_nodes(graph, dead + [mm] + ([bias] if bias is not None else []))
    at = min(at, len(graph.nodes))
    graph.nodes[at:at] = new
    sort_topologically(graph)
    return True
