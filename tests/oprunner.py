"""Helpers shared by the tests: one-node ONNX models from registry samples, and the comparison with
onnxruntime (or the float64 numpy reference where onnxruntime has no kernel for the dtype)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from rtxjit.ir.registry import Rand
from rtxjit.ir.types import DType, TensorType

OPSET = 21
TOL = {"fp32": dict(rtol=1e-4, atol=1e-5), "fp16": dict(rtol=1e-2, atol=1e-2), "bf16": dict(rtol=2e-2, atol=2e-2)}
NP_FLOAT = {"fp32": np.float32, "fp16": np.float16, "fp64": np.float64}


def make_inputs(sample, float_type: str, rng) -> list:
    out = []
    for spec in sample.inputs:
        if spec is None:
            out.append(None)
        elif isinstance(spec, Rand):
            out.append(random_array(spec, float_type, rng))
        else:
            a = np.asarray(spec)
            if a.dtype.kind == "f" and float_type in NP_FLOAT:
                a = a.astype(NP_FLOAT[float_type])
            out.append(a)
    return out


def random_array(spec: Rand, float_type: str, rng) -> np.ndarray:
    dt = spec.dtype
    if dt == "bool":
        return rng.random(spec.shape) < 0.5
    if dt in ("int64", "int32", "int16", "uint16", "int8", "uint8"):
        return rng.integers(int(spec.low), int(spec.high) + 1, size=spec.shape).astype(dt)
    npdt = NP_FLOAT[dt or (float_type if float_type in NP_FLOAT else "fp32")]
    a = rng.uniform(spec.low, spec.high, size=spec.shape)
    a = np.where(np.abs(a) < 1e-3, 0.5, a)  # never zero
    return np.asarray(a).astype(npdt)


def single_node_model(opdef, sample, arrays: list, opset: int = None):
    """A model of one node; inputs at host positions become initializers, the rest graph inputs."""
    names, graph_inputs, inits, infer_args = [], [], [], []
    for i, a in enumerate(arrays):
        if a is None:
            names.append("")
            infer_args.append(None)
            continue
        name = f"in{i}"
        names.append(name)
        dtype = DType.from_numpy(a.dtype)
        if i in opdef.host_inputs:
            inits.append(onnx.numpy_helper.from_array(a, name))
            infer_args.append(a)
        else:
            graph_inputs.append(helper.make_tensor_value_info(name, dtype.onnx_code, a.shape))
            infer_args.append(TensorType(dtype, a.shape))
    attrs = opdef.bind_attrs(dict(sample.attrs), opdef.name)
    out_types = opdef.infer(infer_args, attrs, sample.outputs)
    out_names = [f"out{k}" for k in range(sample.outputs)]
    outputs = [helper.make_tensor_value_info(n, t.dtype.onnx_code, t.shape) for n, t in zip(out_names, out_types)]
    # an op of another domain (com.microsoft.MatMulNBits) is its op type in its domain, imported at its version
    node = helper.make_node(opdef.op_type, names, out_names, domain=opdef.domain, **sample.attrs)
    graph = helper.make_graph([node], f"test_{opdef.name}", graph_inputs, outputs, inits)
    opset = opset or sample.opset or OPSET
    imports = [helper.make_opsetid("", opset)]
    if opdef.domain:
        imports.append(helper.make_opsetid(opdef.domain, opdef.since))
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 10
    feeds = {f"in{i}": a for i, a in enumerate(arrays) if a is not None and i not in opdef.host_inputs}
    return model, feeds


def run_onnxruntime(model, feeds):
    """onnxruntime's outputs, or None where it cannot run the model (no kernel for a dtype)."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, feeds)
    except Exception:
        return None


def reference(opdef, sample, arrays):
    """Float64 numpy reference on the same (rounded) inputs."""
    wide = [a.astype(np.float64) if a is not None and a.dtype.kind == "f" else a for a in arrays]
    attrs = opdef.bind_attrs(dict(sample.attrs), opdef.name)
    return list(opdef.run_reference(wide, attrs, sample.outputs))


def assert_close(got, want, float_type: str, what: str):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if want.dtype.kind in "biu" or got.dtype.kind in "biu":
        np.testing.assert_array_equal(got, want, err_msg=what)
        return
    tol = TOL.get(float_type, TOL["fp32"])
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), err_msg=what, **tol)


def rel_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))
