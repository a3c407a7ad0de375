"""ONNX ops that map onto one of rtxjit's fused ops directly, ahead of their function body.

opset-23/24 ``Attention`` is an ONNX function; expanded, its body (Q and K scaled by sqrt(scale),
GQA through Unsqueeze/Expand/Reshape, a ReduceMax of the mask that zeroes fully masked rows) runs
as a dozen separate kernels. Where the node uses what ``rtxjit.Attention`` computes, it is
translated into that op instead, with small ONNX nodes around it (a boolean mask as
``Where(mask, 0, -inf)``, a constant causal mask, 3-D inputs reshaped to heads); a node that uses
more (past key/value, softcap, the QK output, symbolic causal sizes) returns None and is expanded.

The translation is a list of ONNX nodes that the importer imports as it imports a function body;
``rtxjit.Attention`` is written in the ``rtxjit`` domain.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rtxjit.ir.types import DType, TensorType

RTXJIT_DOMAIN = "rtxjit"


def translate(n: onnx.NodeProto, opset: int, types: list, fresh) -> Optional[list]:
    """ONNX nodes computing ``n``'s outputs through rtxjit's fused ops, or None. ``types`` are
    the node's input types (None for an omitted input); ``fresh(base)`` gives unique names."""
    if n.domain not in ("", "ai.onnx") or n.op_type not in TRANSLATIONS:
        return None
    return TRANSLATIONS[n.op_type](n, opset, types, fresh)


def _attrs(n: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in n.attribute}


def _const(fresh, base: str, value: np.ndarray) -> tuple:
    name = fresh(base)
    node = helper.make_node("Constant", [], [name], name=fresh(base + "_node"),
                            value=numpy_helper.from_array(np.asarray(value), name))
    return name, node


KNOWN_ATTENTION_ATTRS = {"is_causal", "kv_num_heads", "q_num_heads", "qk_matmul_output_mode", "scale", "softcap",
                         "softmax_precision"}


def attention(n: onnx.NodeProto, opset: int, types: list, fresh) -> Optional[list]:
    """opset 23/24 Attention -> rtxjit.Attention (see the module's docstring)."""
    a = _attrs(n)
    if set(a) - KNOWN_ATTENTION_ATTRS:
        return None  # attributes of later versions (local windows, ...): the function body knows them
    outputs = [o for o in n.output]
    if opset < 23 or len(types) > 4 or any(o for o in outputs[1:]):
        return None  # past key/value inputs (or nonpad_kv_seqlen), present / QK outputs
    if float(a.get("softcap", 0.0)) != 0.0 or int(a.get("qk_matmul_output_mode", 0)) != 0:
        return None
    q, k, v = types[:3]
    mask = types[3] if len(types) > 3 else None
    if any(not isinstance(t, TensorType) for t in (q, k, v)) or q.rank != k.rank or q.rank != v.rank:
        return None
    if q.dtype not in (DType.FP32, DType.FP16, DType.BF16) or len({q.dtype, k.dtype, v.dtype}) != 1:
        return None
    nodes, names = [], list(n.input[:3])
    if q.rank == 3:
        hq, hkv = int(a.get("q_num_heads", 0)), int(a.get("kv_num_heads", 0))
        if hq <= 0 or hkv <= 0:
            return None
        for i, heads in enumerate((hq, hkv, hkv)):
            shape, c = _const(fresh, f"{n.name}/heads{i}", np.array([0, 0, heads, -1], np.int64))
            out = fresh(f"{n.name}/split{i}")
            nodes += [c, helper.make_node("Reshape", [names[i], shape], [out], name=fresh(out + "_node"))]
            names[i] = out
        perm = (0, 2, 1, 3)  # logical [B, H, S, D] from stored [B, S, H, D]
        head_dim = q.shape[2] // hq if isinstance(q.shape[2], int) else None
        sq, sk = q.shape[1], k.shape[1]
    elif q.rank == 4:
        hq, hkv = q.shape[1], k.shape[1]
        perm = (0, 1, 2, 3)
        head_dim = q.shape[3] if isinstance(q.shape[3], int) else None
        sq, sk = q.shape[2], k.shape[2]
    else:
        return None
    if not (isinstance(hq, int) and isinstance(hkv, int)) or hkv == 0 or hq % hkv:
        return None
    scale = a.get("scale")
    if scale is None:
        if head_dim is None:
            return None
        scale = head_dim ** -0.5
    bias = None
    if mask is not None and n.input[3]:
        bias = n.input[3]
        if mask.dtype is DType.BOOL:
            zero, c0 = _const(fresh, f"{n.name}/zero", np.array(0, q.dtype.to_numpy() if q.dtype is not DType.BF16
                                                                  else np.float32))
            ninf, c1 = _const(fresh, f"{n.name}/ninf", np.array(-np.inf, np.float32 if q.dtype is DType.BF16
                                                                 else q.dtype.to_numpy()))
            bias = fresh(f"{n.name}/mask_bias")
            nodes += [c0, c1, helper.make_node("Where", [n.input[3], zero, ninf], [bias], name=fresh(bias + "_node"))]
        elif not mask.dtype.is_float:
            return None
    if int(a.get("is_causal", 0)):
        if not (isinstance(sq, int) and isinstance(sk, int)):
            return None
        causal = np.where(np.tril(np.ones((sq, sk), bool)), 0.0, -np.inf).astype(np.float32)
        cname, c = _const(fresh, f"{n.name}/causal", causal)
        nodes.append(c)
        if bias is None:
            bias = cname
        else:
            total = fresh(f"{n.name}/mask_total")
            nodes.append(helper.make_node("Add", [bias, cname], [total], name=fresh(total + "_node")))
            bias = total
    inputs = names + ([bias] if bias is not None else [])
    fused_out = fresh(f"{n.name}/heads_out") if q.rank == 3 else outputs[0]
    nodes.append(helper.make_node("Attention", inputs, [fused_out], name=fresh(f"{n.name}/attention"),
                                  domain=RTXJIT_DOMAIN, scale=float(scale), q_perm=list(perm), k_perm=list(perm),
                                  v_perm=list(perm), out_perm=list(perm), nan_rows_zero=1,
                                  kv_group=hq // hkv))
    if q.rank == 3:
        shape, c = _const(fresh, f"{n.name}/merge", np.array([0, 0, -1], np.int64))
        nodes += [c, helper.make_node("Reshape", [fused_out, shape], [outputs[0]], name=fresh(f"{n.name}/merge_node"))]
    return nodes


TRANSLATIONS = {"Attention": attention}
