"""FP8 Q/DQ models from fp32 ones, calibrated on sample inputs (onnxruntime.quantization has no FP8
QDQ writer for the CPU; TensorRT's ModelOpt is the usual tool, and a heavy one).

    from rtxjit.quant.calibrate import fp8_qdq
    q = fp8_qdq(onnx.load("model.onnx"), [{"x": x} for x in samples])   # an onnx.ModelProto
    onnx.save(q, "model.fp8.onnx")

Each MatMul and Gemm whose weight (input 1) is a 2-D initializer gets
``x -> QuantizeLinear(fp8) -> DequantizeLinear -> op <- DequantizeLinear(fp8 weight)``:

- activations per tensor: ``scale = amax / fp8_max`` with amax the largest ``|x|`` over the samples,
  run through onnxruntime with the activations added as outputs (1 where amax is 0);
- weights per output channel (MatMul ``[K, N]``: per column, axis 1; Gemm with ``transB``: per
  row, axis 0): ``scale[n] = amax[n] / fp8_max``, the weight stored as fp8 (round to nearest even,
  ml_dtypes' conversion; every value is within range by construction).

rtxjit/quant/fuse.py then runs each such op as one fp8 x fp8 -> fp32 tensor-core product (sm_89 and
newer; older SMs are refused by the precision check). Models below opset 19 (the first with fp8
Q/DQ) are converted to 19 with onnx's version converter first. Products whose weights are not
initializers (attention's Q @ K^T) stay as they are.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, version_converter

from rtxjit.errors import UsageError

FORMATS = {"e4m3fn": (TensorProto.FLOAT8E4M3FN, ml_dtypes.float8_e4m3fn, 448.0),
           "e5m2": (TensorProto.FLOAT8E5M2, ml_dtypes.float8_e5m2, 57344.0)}
FP8_OPSET = 19


def _targets(model: onnx.ModelProto) -> list:
    """``(node, weight initializer, weight's output axis)`` of the products to quantize."""
    inits = {i.name: i for i in model.graph.initializer}
    made_by = {o: n for n in model.graph.node for o in n.output}
    out = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        name = node.input[1]
        seen = set()
        while name in made_by and made_by[name].op_type == "Identity" and name not in seen:
            # the TorchScript exporter shares equal weights through Identity nodes (an nn.TransformerEncoder's
            # cloned layers): only the first layer's products were quantized
            seen.add(name)
            name = made_by[name].input[0]
        w = inits.get(name)
        if w is None or len(w.dims) != 2 or w.data_type != TensorProto.FLOAT:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and attrs.get("transA", 0):
            continue
        out.append((node, w, 0 if node.op_type == "Gemm" and attrs.get("transB", 0) else 1))
    return out


def activation_amax(model: onnx.ModelProto, names: list, samples: list) -> dict:
    """The largest ``|value|`` of each named value over the samples, by onnxruntime."""
    import onnxruntime as ort  # a test / benchmark extra of rtxjit, needed here only

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for name in names:
        if name not in have:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    amax = dict.fromkeys(names, 0.0)
    for feeds in samples:
        for name, value in zip(out_names, sess.run(None, feeds)):
            if name in amax:
                amax[name] = max(amax[name], float(np.nanmax(np.abs(value))) if value.size else 0.0)
    return amax


def fp8_qdq(model: onnx.ModelProto, samples: list, fmt: str = "e4m3fn") -> onnx.ModelProto:
    """A copy of ``model`` with FP8 Q/DQ around its MatMul / Gemm products (see the module
    docstring); ``samples`` is a list of feed dicts."""
    if fmt not in FORMATS:
        raise UsageError(f"fp8 format {fmt!r}: one of {sorted(FORMATS)}")
    if not samples:
        raise UsageError("fp8_qdq needs at least one sample input to calibrate the activations")
    code, np_type, fp8_max = FORMATS[fmt]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < FP8_OPSET:
        model = version_converter.convert_version(model, FP8_OPSET)
    else:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    targets = _targets(model)
    amax = activation_amax(model, sorted({node.input[0] for node, _, _ in targets}), samples)
    graph = model.graph
    zero = numpy_helper.from_array(np.zeros((), np_type), "fp8_zero")
    graph.initializer.append(zero)
    quantized = {}  # activation name -> its DQ output (one Q/DQ pair per activation)
    weights = set()  # fp8 weights made (a weight read by several products is quantized once)
    new_nodes = []
    for node in graph.node:
        target = next((t for t in targets if t[0] is node), None)
        if target is not None:
            _, w, axis = target
            x = node.input[0]
            if x not in quantized:
                scale = np.float32(amax[x] / fp8_max if amax[x] > 0 else 1.0)
                graph.initializer.append(numpy_helper.from_array(scale, f"{x}_fp8_scale"))
                new_nodes += [helper.make_node("QuantizeLinear", [x, f"{x}_fp8_scale", "fp8_zero"], [f"{x}_fp8"]),
                              helper.make_node("DequantizeLinear", [f"{x}_fp8", f"{x}_fp8_scale"], [f"{x}_fp8_dq"])]
                quantized[x] = f"{x}_fp8_dq"
            wname = f"{w.name}_fp8_axis{axis}"
            if wname not in weights:
                wv = numpy_helper.to_array(w).astype(np.float32)
                w_amax = np.abs(wv).max(axis=1 - axis)
                w_scale = np.where(w_amax > 0, w_amax / fp8_max, 1.0).astype(np.float32)
                shape = (1, -1) if axis == 1 else (-1, 1)
                wq = (wv / w_scale.reshape(shape)).astype(np_type)
                graph.initializer.extend([numpy_helper.from_array(wq, wname),
                                          numpy_helper.from_array(w_scale, f"{wname}_scale")])
                new_nodes.append(helper.make_node("DequantizeLinear", [wname, f"{wname}_scale"], [f"{wname}_dq"],
                                                  axis=axis))
                weights.add(wname)
            node.input[0], node.input[1] = quantized[x], f"{wname}_dq"
        kept = onnx.NodeProto()
        kept.CopyFrom(node)
        new_nodes.append(kept)
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return model
