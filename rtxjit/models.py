"""Built-in demo models, generated in code (no download): a ResNet-style CNN and a BERT-style
encoder layer, as ONNX ModelProtos with seeded random weights, in fp32 or fp16."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class _Builder:
    """Appends nodes and seeded random initializers to one ONNX graph."""

    def __init__(self, seed: int, dtype):
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.nodes: list = []
        self.inits: list = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def weight(self, prefix: str, shape, scale: float = None, offset: float = 0.0, dtype=None) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
        scale = scale if scale is not None else 1.0 / np.sqrt(fan_in)
        value = offset + self.rng.uniform(-scale, scale, size=shape)
        return self.const(prefix, value.astype(dtype or self.dtype))

    def const(self, prefix: str, value: np.ndarray) -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list, n_out: int = 1, **attrs):
        outs = [self.name(op.lower() + "_") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op + "_node"), **attrs))
        return outs[0] if n_out == 1 else outs

    def model(self, name: str, inputs: list, outputs: list, opset: int = OPSET) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="rtxjit")
        model.ir_version = 8
        return model


def _elem(dtype) -> int:
    return TensorProto.FLOAT16 if np.dtype(dtype) == np.float16 else TensorProto.FLOAT


# --- ResNet-style CNN -------------------------------------------------------------------------

def _conv_bn(b: _Builder, x: str, cin: int, cout: int, k: int, stride: int, relu: bool) -> str:
    w = b.weight("conv_w", (cout, cin, k, k))
    y = b.node("Conv", [x, w], kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4)
    bn = [b.weight("bn_scale", (cout,), 0.2, 1.0), b.weight("bn_bias", (cout,), 0.1),
          b.weight("bn_mean", (cout,), 0.1), b.weight("bn_var", (cout,), 0.2, 1.0)]
    y = b.node("BatchNormalization", [y] + bn, epsilon=1e-5)
    return b.node("Relu", [y]) if relu else y


def _basic_block(b: _Builder, x: str, cin: int, cout: int, stride: int) -> str:
    y = _conv_bn(b, x, cin, cout, 3, stride, relu=True)
    y = _conv_bn(b, y, cout, cout, 3, 1, relu=False)
    skip = x if stride == 1 and cin == cout else _conv_bn(b, x, cin, cout, 1, stride, relu=False)
    return b.node("Relu", [b.node("Add", [y, skip])])


def resnet_cnn(dtype=np.float32, batch="N", size: int = 32, width: int = 16, classes: int = 10,
               seed: int = 0) -> onnx.ModelProto:
    """conv-bn-relu stem, max pool, two residual stages (one strided), global pool, gemm head."""
    b = _Builder(seed, dtype)
    y = _conv_bn(b, "image", 3, width, 3, 1, relu=True)
    y = b.node("MaxPool", [y], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    y = _basic_block(b, y, width, width, 1)
    y = _basic_block(b, y, width, 2 * width, 2)
    y = b.node("GlobalAveragePool", [y])
    y = b.node("Flatten", [y], axis=1)
    w = b.weight("fc_w", (classes, 2 * width))
    bias = b.weight("fc_b", (classes,), 0.1)
    y = b.node("Gemm", [y, w, bias], transB=1)
    b.nodes[-1].output[0] = "logits"
    elem = _elem(dtype)
    return b.model("resnet_cnn", [helper.make_tensor_value_info("image", elem, [batch, 3, size, size])],
                   [helper.make_tensor_value_info("logits", elem, [batch, classes])])


def _bottleneck(b: _Builder, x: str, cin: int, mid: int, stride: int) -> str:
    y = _conv_bn(b, x, cin, mid, 1, 1, relu=True)
    y = _conv_bn(b, y, mid, mid, 3, stride, relu=True)
    y = _conv_bn(b, y, mid, 4 * mid, 1, 1, relu=False)
    skip = x if stride == 1 and cin == 4 * mid else _conv_bn(b, x, cin, 4 * mid, 1, stride, relu=False)
    return b.node("Relu", [b.node("Add", [y, skip])])


def resnet50_like(dtype=np.float32, batch="N", size=224, classes: int = 1000, seed: int = 0,
                  layers=(3, 4, 6, 3)) -> onnx.ModelProto:
    """ResNet-50's architecture (7x7 stem, bottleneck stages of 3, 4, 6, 3 blocks, 25.6M weights)
    with seeded random weights: for engine sizes and refit checks where torchvision is absent.
    ``size`` may be a symbol ("S"): one engine then serves several image sizes."""
    b = _Builder(seed, dtype)
    w = b.weight("conv_w", (64, 3, 7, 7))
    y = b.node("Conv", ["image", w], kernel_shape=[7, 7], strides=[2, 2], pads=[3, 3, 3, 3])
    bn = [b.weight("bn_scale", (64,), 0.2, 1.0), b.weight("bn_bias", (64,), 0.1),
          b.weight("bn_mean", (64,), 0.1), b.weight("bn_var", (64,), 0.2, 1.0)]
    y = b.node("Relu", [b.node("BatchNormalization", [y] + bn, epsilon=1e-5)])
    y = b.node("MaxPool", [y], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, blocks in enumerate(layers):
        mid = 64 * 2 ** stage
        for i in range(blocks):
            y = _bottleneck(b, y, cin, mid, 2 if i == 0 and stage > 0 else 1)
            cin = 4 * mid
    y = b.node("Flatten", [b.node("GlobalAveragePool", [y])], axis=1)
    y = b.node("Gemm", [y, b.weight("fc_w", (classes, cin)), b.weight("fc_b", (classes,), 0.1)], transB=1)
    b.nodes[-1].output[0] = "logits"
    elem = _elem(dtype)
    return b.model("resnet50_like", [helper.make_tensor_value_info("image", elem, [batch, 3, size, size])],
                   [helper.make_tensor_value_info("logits", elem, [batch, classes])])


# --- BERT-style encoder layer -----------------------------------------------------------------

def _linear(b: _Builder, x: str, cin: int, cout: int) -> str:
    return b.node("Add", [b.node("MatMul", [x, b.weight("w", (cin, cout))]), b.weight("b", (cout,), 0.1)])


def _layer_norm(b: _Builder, x: str, hidden: int) -> str:
    return b.node("LayerNormalization", [x, b.weight("ln_g", (hidden,), 0.2, 1.0), b.weight("ln_b", (hidden,), 0.1)],
                  axis=-1, epsilon=1e-5)


def _heads(b: _Builder, x: str, heads: int, head_dim: int, perm) -> str:
    shape = b.const("heads_shape", np.array([0, 0, heads, head_dim], np.int64))
    return b.node("Transpose", [b.node("Reshape", [x, shape])], perm=perm)


def bert_encoder(dtype=np.float32, batch="N", seq="S", hidden: int = 64, heads: int = 4, ffn: int = 128,
                 seed: int = 0) -> onnx.ModelProto:
    """Multi-head self-attention with an additive mask, residuals, LayerNorm, and a Gelu feed-forward."""
    b = _Builder(seed, dtype)
    head_dim = hidden // heads
    q = _heads(b, _linear(b, "hidden", hidden, hidden), heads, head_dim, [0, 2, 1, 3])
    k = _heads(b, _linear(b, "hidden", hidden, hidden), heads, head_dim, [0, 2, 3, 1])
    v = _heads(b, _linear(b, "hidden", hidden, hidden), heads, head_dim, [0, 2, 1, 3])
    scores = b.node("Mul", [b.node("MatMul", [q, k]), b.const("scale", np.array(head_dim ** -0.5, dtype))])
    mask = b.node("Unsqueeze", ["mask", b.const("mask_axes", np.array([1, 2], np.int64))])
    probs = b.node("Softmax", [b.node("Add", [scores, mask])], axis=-1)
    ctx = b.node("Transpose", [b.node("MatMul", [probs, v])], perm=[0, 2, 1, 3])
    ctx = b.node("Reshape", [ctx, b.const("merge_shape", np.array([0, 0, hidden], np.int64))])
    x = _layer_norm(b, b.node("Add", [_linear(b, ctx, hidden, hidden), "hidden"]), hidden)
    h = b.node("Gelu", [_linear(b, x, hidden, ffn)])
    _layer_norm(b, b.node("Add", [_linear(b, h, ffn, hidden), x]), hidden)
    b.nodes[-1].output[0] = "encoded"
    elem = _elem(dtype)
    inputs = [helper.make_tensor_value_info("hidden", elem, [batch, seq, hidden]),
              helper.make_tensor_value_info("mask", elem, [batch, seq])]
    outputs = [helper.make_tensor_value_info("encoded", elem, [batch, seq, hidden])]
    return b.model("bert_encoder", inputs, outputs, opset=20)  # Gelu is an opset-20 op


def demo_inputs(model: onnx.ModelProto, batch: int = 2, seq: int = 16, seed: int = 1) -> dict:
    """Random non-zero feeds for a demo model: images/hidden states, and a 0/-10000 attention mask."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        dtype = np.float16 if vi.type.tensor_type.elem_type == TensorProto.FLOAT16 else np.float32
        dims = []
        for d in vi.type.tensor_type.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (batch if d.dim_param == "N" else seq))
        if vi.name == "mask":
            keep = rng.random(dims) < 0.85
            keep[:, 0] = True
            feeds[vi.name] = np.where(keep, 0.0, -10000.0).astype(dtype)
        else:
            feeds[vi.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


DEMO_MODELS = {"cnn": resnet_cnn, "encoder": bert_encoder}
