"""onnx's own node conformance suite (``onnx.backend.test``) against rtxjit, through
``rtxjit.onnx.backend.RtxjitBackend``.

Selection. A node test is selected when every op in its model is in rtxjit's registry (default
domain), or is one the importer expands into registry ops from its ONNX function body or from the
model's local function (rtxjit/onnx/functions.py; ``expands`` below). ONNX test names do not
follow the op names reliably (``test_leakyrelu``, ``test_batchnorm_epsilon``,
``test_greater_equal``, ``test_reduce_sum_...``), so each case's model says which ops it tests.
The same rule decides the ``_expanded`` variants (the op's function body inlined by the test's
author): one is selected only when all of its ops are supported or expand, so it tests rtxjit's
composition of ops it has; one that needs an op rtxjit lacks would only fail for that reason, and
is picked up by itself once the op is registered. The selection becomes one ``include`` regex.

Expected failures are ``EXPECTED_FAILURES`` in ``tests/onnx_conformance_xfail.py``: a case-name
regex (without the ``_cpu`` / ``_cuda`` suffix) -> the reason. They run as strict xfails, so a
fixed case fails the suite until its entry is removed: the list only shrinks.

Devices: the 'CPU' variants (Triton's interpreter) run in CI; the 'CUDA' ones exist only in a
process where torch sees a GPU and the interpreter is off.
"""

from __future__ import annotations

import functools
import re

import onnx
import onnx.backend.test
import pytest
from onnx.backend.test.loader import load_model_tests

from rtxjit.errors import RtxjitError
from rtxjit.ir.registry import all_ops
from rtxjit.onnx.backend import RtxjitBackend
from rtxjit.onnx.importer import import_model
from tests.onnx_conformance_xfail import EXPECTED_FAILURES

DEFAULT_DOMAINS = ("", "ai.onnx")


def model_ops(model) -> set:
    """(domain, op type) of every node of the model's graph and of its local functions."""
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    return {(n.domain, n.op_type) for n in nodes}


# The importer's words for an op it has neither in the registry nor as a function body.
MISSING_OP = re.compile(r"op \S+ is not supported by rtxjit|domain '[^']*' is not supported")
EXPANDED = "expanded from its function body"  # the importer's prefix of an error inside a body


def expands(model, missing: set) -> bool:
    """Whether the importer expands every op of ``missing`` (ops outside the registry) from ONNX
    function bodies or the model's local functions, down to registry ops (bodies nest, and a
    context-dependent body depends on the node's input types, so the import itself answers)."""
    local = {(f.domain, f.name) for f in model.functions}
    opset = max((i.version for i in model.opset_import if i.domain in DEFAULT_DOMAINS), default=None)
    if opset is None:
        return False
    for domain, op in missing - local:
        if domain not in DEFAULT_DOMAINS:
            return False
        try:
            schema = onnx.defs.get_schema(op, opset)
        except onnx.defs.SchemaError:
            return False
        if not (schema.has_function or schema.has_context_dependent_function):
            return False
    try:
        import_model(model)
    except RtxjitError as exc:
        # Failed inside a body for a reason other than a missing op: selected, an expected failure
        # with its reason. Failed before reaching a body (opset floor, a sequence input): whether
        # the op expands is not known, so the case is left out, as a missing op leaves it out.
        return EXPANDED in str(exc) and not MISSING_OP.search(str(exc))
    return True


@functools.cache
def selected_case_names() -> list:
    supported = {(d, name) for name in all_ops() for d in DEFAULT_DOMAINS}
    names = []
    for case in load_model_tests(kind="node"):
        ops = model_ops(case.model)
        if ops <= supported or expands(case.model, ops - supported):
            names.append(case.name)
    return sorted(names)


def devices() -> list:
    return [d for d in ("CPU", "CUDA") if RtxjitBackend.supports_device(d)]


def expected_failure(case_name: str):
    """The reason ``case_name`` is expected to fail, or None."""
    for pattern, reason in EXPECTED_FAILURES.items():
        if re.fullmatch(pattern, case_name):
            return reason
    return None


def _build() -> type:
    """onnx's node test class, holding only the selected cases for this process's devices, with the
    expected failures marked as strict xfails."""
    names = selected_case_names()
    suffix = "|".join(d.lower() for d in devices()) or "none"
    selection = re.compile(rf"^(?:{'|'.join(map(re.escape, names))})_(?:{suffix})$")
    backend_test = onnx.backend.test.BackendTest(RtxjitBackend, __name__).include(selection.pattern)
    node_tests = backend_test.test_cases["OnnxBackendNodeModelTest"]
    for attr in [a for a in vars(node_tests) if a.startswith("test_")]:
        if not selection.match(attr):
            delattr(node_tests, attr)  # not selected, or for a device this process lacks: not collected
            continue
        reason = expected_failure(attr.rsplit("_", 1)[0])
        if reason:
            setattr(node_tests, attr, pytest.mark.xfail(reason=reason, strict=True)(getattr(node_tests, attr)))
    return node_tests


OnnxBackendNodeModelTest = _build()


def test_every_expected_failure_names_a_selected_case():
    """An entry that matches no selected case is stale (its op left the registry or was renamed)."""
    names = selected_case_names()
    stale = [p for p in EXPECTED_FAILURES if not any(re.fullmatch(p, n) for n in names)]
    assert not stale, f"expected failures matching no selected case: {stale}"


