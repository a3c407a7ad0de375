"""An ``onnx.backend.base.Backend`` over ``InferenceSession``, so onnx's own node conformance suite
(``onnx.backend.test.BackendTest``) runs against rtxjit.

Devices: 'CPU' is Triton's interpreter (it must be on before triton is imported, which importing
rtxjit arranges when no GPU is asked for); 'CUDA' is the GPU, offered only when torch sees one and
the interpreter is off. bf16 tensors cross the boundary as ``ml_dtypes.bfloat16`` numpy arrays,
which numpy cannot hand to torch directly: they travel as their bit patterns (fp8 likewise).
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx.backend.base as onnx_backend
import torch
from onnx import helper

from rtxjit import config
from rtxjit.errors import InputError, UsageError
from rtxjit.ir.types import SUB_BYTE_INTS, DType
from rtxjit.session import InferenceSession

DEVICES = {"CPU": "cpu", "CUDA": "cuda"}


@functools.cache
def _bit_types() -> tuple:
    """(numpy dtype, torch dtype, torch integer type of its width) for the ``ml_dtypes`` types
    that torch.from_numpy refuses: they cross as bit patterns."""
    import ml_dtypes

    return ((np.dtype(ml_dtypes.bfloat16), torch.bfloat16, torch.int16),
            (np.dtype(ml_dtypes.float8_e4m3fn), torch.float8_e4m3fn, torch.int8),
            (np.dtype(ml_dtypes.float8_e5m2), torch.float8_e5m2, torch.int8))


def to_feed(x):
    """A feed as a torch tensor, so the session answers in torch too (bf16 and fp8 included).
    ``ml_dtypes`` int4 / uint4 / int2 / uint2 arrays stay numpy: torch has no such type (an int8
    tensor would be an int8 feed), and the session takes them as DType.INT4 / UINT4 / INT2 / UINT2
    (int8 / uint8 on the device)."""
    x = np.array(x)  # a writable copy that keeps 0-d shapes (torch.from_numpy wants writable)
    for np_dtype, torch_dtype, _ in _bit_types():
        if x.dtype == np_dtype:
            return torch.from_numpy(x.view(f"i{x.itemsize}")).view(torch_dtype)
    if x.dtype.name in ("int4", "uint4", "int2", "uint2"):
        return x
    return torch.from_numpy(x)


def to_numpy(t, dtype: DType = None) -> np.ndarray:
    """A session output (a torch tensor, or numpy for a model without inputs) as numpy; an output
    of ``dtype`` INT4 / UINT4 / INT2 / UINT2 (int8 / uint8 on the device) as ``ml_dtypes`` arrays."""
    if dtype in SUB_BYTE_INTS:
        return np.asarray(to_numpy(t)).astype(dtype.to_numpy())
    if not isinstance(t, torch.Tensor):
        return np.asarray(t)
    t = t.detach().cpu()
    for np_dtype, torch_dtype, int_dtype in _bit_types():
        if t.dtype == torch_dtype:
            return t.view(int_dtype).numpy().view(np_dtype)
    return t.numpy()


class RtxjitRep(onnx_backend.BackendRep):
    """A prepared model: ``run(inputs)`` takes the graph inputs in order (or by name) and returns
    the graph outputs in order."""

    def __init__(self, session: InferenceSession):
        self.session = session
        self.input_names = [a.name for a in session.get_inputs()]
        self.output_names = [a.name for a in session.get_outputs()]

    def run(self, inputs, **kwargs) -> tuple:
        if isinstance(inputs, dict):
            feeds = {k: to_feed(v) for k, v in inputs.items()}
        else:
            if isinstance(inputs, np.ndarray):
                inputs = [inputs]
            if len(inputs) != len(self.input_names):
                raise InputError(f"the model takes {len(self.input_names)} inputs {self.input_names}, "
                                 f"got {len(inputs)}")
            feeds = {n: to_feed(x) for n, x in zip(self.input_names, inputs)}
        outs = self.session.run(None, feeds)
        dtypes = [v.type.dtype for v in self.session.graph.outputs]
        return onnx_backend.namedtupledict("Outputs", self.output_names)(*[to_numpy(o, d) for o, d in zip(outs, dtypes)])


class RtxjitBackend(onnx_backend.Backend):
    @classmethod
    def supports_device(cls, device: str) -> bool:
        """'CPU' needs Triton's interpreter and 'CUDA' a visible GPU; one process runs one of them,
        because the interpreter is chosen when triton is imported."""
        kind = onnx_backend.Device(device).type
        if kind == onnx_backend.DeviceType.CPU:
            return config.interpreter_enabled()
        if kind == onnx_backend.DeviceType.CUDA:
            return torch.cuda.is_available() and not config.interpreter_enabled()
        return False

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs) -> RtxjitRep:
        super().prepare(model, device, **kwargs)  # onnx's checker: a malformed model fails here
        kind = device.split(":")[0]
        if kind not in DEVICES:
            raise UsageError(f"unknown device '{device}': use 'CPU' or 'CUDA'")
        return RtxjitRep(InferenceSession(model, device=DEVICES[kind]))

    @classmethod
    def run_model(cls, model: onnx.ModelProto, inputs, device: str = "CPU", **kwargs) -> tuple:
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def run_node(cls, node: onnx.NodeProto, inputs, device: str = "CPU", outputs_info=None, **kwargs) -> tuple:
        """One node as a one-node model; its outputs are typed by ``outputs_info`` [(numpy dtype,
        shape)] where given, else by onnx's shape inference (onnx's checker wants them typed)."""
        super().run_node(node, inputs, device, outputs_info, **kwargs)
        opset = kwargs.get("opset_version", onnx.defs.onnx_opset_version())
        model = _node_model(node, inputs, outputs_info, opset)
        return cls.run_model(model, inputs, device)


def _node_model(node: onnx.NodeProto, inputs, outputs_info, opset: int) -> onnx.ModelProto:
    arrays = [np.asarray(x) for x in inputs]
    names = [n for n in node.input if n]
    graph_inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                    for n, a in zip(names, arrays)]
    if outputs_info is not None:
        graph_outputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(np.dtype(dt)), shape)
                         for n, (dt, shape) in zip(node.output, outputs_info)]
    else:
        graph_outputs = [helper.make_empty_tensor_value_info(n) for n in node.output]
    graph = helper.make_graph([node], f"run_node_{node.op_type}", graph_inputs, graph_outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return model if outputs_info is not None else onnx.shape_inference.infer_shapes(model)
