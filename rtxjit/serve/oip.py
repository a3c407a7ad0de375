"""The Open Inference Protocol (KServe v2, the HTTP/REST form Triton Inference Server speaks):
metadata, and infer requests and responses, decoded and encoded without Ray or a web server.

    GET  /v2/models/<name>          {"name", "platform", "inputs": [{"name", "datatype", "shape"}], "outputs": [...]}
    POST /v2/models/<name>/infer    {"id"?, "inputs": [{"name", "shape", "datatype", "data"}], "outputs"?: [{"name"}]}
                                 -> {"model_name", "id"?, "outputs": [{"name", "shape", "datatype", "data"}]}

Shapes are lists of ints, -1 for a dynamic dim in metadata; ``data`` is the tensor flattened in
row-major order (a nested list of the right shape is accepted too, as Triton accepts it); datatypes
are KServe's spellings (``FP32``, ``FP16``, ``INT64``, ``BOOL`` ...). A request that cannot be run as
it is given is a ``ProtocolError`` (status 400, or 404 for an unknown model) whose text names the
input or output, answered as ``{"error": "..."}``.

Values are checked, not converted silently: a float given for an integer input, a value outside an
integer type's range, a number for a BOOL input or a datatype other than the model's are errors (a
client that sends FP64 to an FP32 model learns it, as Triton's clients do), since a truncated index
or a wrapped byte would give a wrong answer without one.

Triton's binary tensor extension is spoken too, so ``tritonclient.http`` works with its defaults:
a request body of a JSON header (its length in the ``Inference-Header-Content-Length`` header)
followed by the raw little-endian bytes of each input whose ``parameters`` give ``binary_data_size``;
outputs asked for with ``parameters: {"binary_data": true}`` (or the request's
``binary_data_output``) come back the same way.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from rtxjit.errors import InputError
from rtxjit.ir.types import DType

# rtxjit's types that the protocol has a name for (fp8 and int4 have none: a model with such an
# input or output cannot be served over it, see ``kserve_datatype``)
KSERVE_DATATYPES = {
    DType.BOOL: "BOOL", DType.UINT8: "UINT8", DType.INT8: "INT8", DType.UINT16: "UINT16", DType.INT16: "INT16",
    DType.INT32: "INT32", DType.INT64: "INT64", DType.UINT32: "UINT32", DType.UINT64: "UINT64",
    DType.FP16: "FP16", DType.FP32: "FP32", DType.FP64: "FP64", DType.BF16: "BF16",
}
HEADER_LENGTH = "inference-header-content-length"  # Triton's binary extension (header names are case-blind)


class ProtocolError(InputError):
    """A request the server cannot run as given: answered with ``status`` and ``{"error": text}``."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def kserve_datatype(dtype: DType, what: str) -> str:
    """The protocol's name of ``dtype``; a ProtocolError naming ``what`` (e.g. "input 'x'") where it
    has none."""
    name = KSERVE_DATATYPES.get(dtype)
    if name is None:
        raise ProtocolError(f"{what} has type {dtype.short}, which the Open Inference Protocol cannot carry "
                            f"(it has {sorted(KSERVE_DATATYPES.values())})", status=500)
    return name


def _tensor_metadata(arg, what: str) -> dict:
    return {"name": arg.name, "datatype": kserve_datatype(arg.dtype, f"{what} '{arg.name}'"),
            "shape": [d if isinstance(d, int) else -1 for d in arg.shape]}


def model_metadata(name: str, inputs: list, outputs: list) -> dict:
    """``GET /v2/models/<name>``: ``inputs`` / ``outputs`` are the session's ``NodeArg``s (name,
    shape of ints and symbol names, dtype)."""
    return {"name": name, "versions": ["1"], "platform": "rtxjit",
            "inputs": [_tensor_metadata(a, "input") for a in inputs],
            "outputs": [_tensor_metadata(a, "output") for a in outputs]}


@dataclass
class InferRequest:
    """A decoded infer request: ``feeds`` (input name -> numpy array, or a torch tensor for BF16)
    in the model's input order; ``outputs``: the names asked for (None: all); ``binary``: the
    outputs to send as binary data."""

    feeds: dict
    outputs: Optional[list] = None
    id: Optional[str] = None
    binary: set = field(default_factory=set)

    @property
    def rows(self) -> int:
        """Dim 0 of the first input (the batch a concatenation adds up)."""
        first = next(iter(self.feeds.values()))
        return int(first.shape[0]) if len(first.shape) else 1


def _json_object(data: bytes, what: str) -> dict:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    return doc


def _shape_of(name: str, shape) -> tuple:
    if not isinstance(shape, list) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise ProtocolError(f"input '{name}': shape must be a list of integers >= 0, got {shape!r}")
    return tuple(shape)


def _numbers(name: str, data, datatype: str, count: int) -> np.ndarray:
    """``data`` (a flat or nested JSON list) as a flat numpy array, its kind checked against
    ``datatype`` and its length against ``count``."""
    if not isinstance(data, list):
        raise ProtocolError(f"input '{name}': 'data' must be a list of values, got {type(data).__name__}")
    try:
        values = np.asarray(data)
    except ValueError:  # ragged nesting
        raise ProtocolError(f"input '{name}': 'data' is not a flat (or regularly nested) list of values") from None
    values = values.reshape(-1)
    if values.size != count:
        raise ProtocolError(f"input '{name}': its shape holds {count} values, 'data' has {values.size}")
    if count == 0:
        return values
    kind = values.dtype.kind
    if datatype == "BOOL":
        if kind != "b":
            raise ProtocolError(f"input '{name}': BOOL data must be true/false, got {values.dtype} values")
    elif datatype.startswith(("INT", "UINT")):
        if kind not in "iu":
            raise ProtocolError(f"input '{name}': {datatype} data must be integers, got {_kind_name(values)} values")
        info = np.iinfo(datatype.lower())
        lo, hi = int(values.min()), int(values.max())
        if lo < info.min or hi > info.max:
            bad = lo if lo < info.min else hi
            raise ProtocolError(f"input '{name}': value {bad} is out of the range of {datatype} "
                                f"[{info.min}, {info.max}]")
    elif kind not in "iuf":
        raise ProtocolError(f"input '{name}': {datatype} data must be numbers, got {_kind_name(values)} values")
    return values


def _kind_name(values: np.ndarray) -> str:
    return {"b": "boolean", "f": "floating-point", "U": "string", "S": "string", "O": "mixed"}.get(
        values.dtype.kind, str(values.dtype))


def _from_bytes(name: str, raw: bytes, dtype: DType, count: int):
    if len(raw) != count * dtype.itemsize:
        raise ProtocolError(f"input '{name}': its shape holds {count} values of {dtype.itemsize} bytes, "
                            f"binary_data_size is {len(raw)}")
    if dtype is DType.BF16:
        return torch.frombuffer(bytearray(raw), dtype=torch.bfloat16) if count else torch.empty(0, dtype=torch.bfloat16)
    values = np.frombuffer(raw, dtype=np.dtype(dtype.value[2]).newbyteorder("<"), count=count)
    if dtype is DType.BOOL and count and values.view(np.uint8).max() > 1:
        raise ProtocolError(f"input '{name}': BOOL binary data must be bytes 0 or 1")
    return values.astype(dtype.value[2])  # native order, writable


def _typed(values: np.ndarray, dtype: DType):
    """Checked values as the model's type: numpy, or a torch tensor for BF16 (numpy has none)."""
    if dtype is DType.BF16:
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16)
    return np.ascontiguousarray(values, dtype=dtype.value[2])


def decode_infer_request(body: bytes, inputs: list, outputs: list,
                         header_length: Optional[int] = None) -> InferRequest:
    """An infer request's body as feeds for the model whose ``inputs`` and ``outputs`` (``NodeArg``s)
    are given; ``header_length``: the JSON header's length in a binary-extension body (the
    ``Inference-Header-Content-Length`` header), None for a JSON body."""
    if header_length is None:
        doc, rest = _json_object(body, "the request body"), b""
    else:
        if header_length < 0 or header_length > len(body):
            raise ProtocolError(f"Inference-Header-Content-Length {header_length} is outside the body's "
                                f"{len(body)} bytes")
        doc, rest = _json_object(body[:header_length], "the request's JSON header"), body[header_length:]
    expected = {a.name: a for a in inputs}
    given = doc.get("inputs")
    if not isinstance(given, list) or not given:
        raise ProtocolError("the request has no 'inputs' (a list of {name, shape, datatype, data})")
    feeds: dict = {}
    offset = 0
    for item in given:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ProtocolError(f"each of 'inputs' must be an object with a 'name', got {_short(item)}")
        name = item["name"]
        arg = expected.get(name)
        if arg is None:
            raise ProtocolError(f"unknown input '{name}'; the model's inputs are {sorted(expected)}")
        if name in feeds:
            raise ProtocolError(f"input '{name}' is given twice")
        want = kserve_datatype(arg.dtype, f"input '{name}'")
        if item.get("datatype") != want:
            raise ProtocolError(f"input '{name}': datatype {item.get('datatype')!r}, the model expects {want}")
        shape = _shape_of(name, item.get("shape"))
        count = math.prod(shape)
        params = item.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if header_length is None:
                raise ProtocolError(f"input '{name}': binary_data_size without an Inference-Header-Content-Length "
                                    "header")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(rest):
                raise ProtocolError(f"input '{name}': binary_data_size {size!r} does not fit the "
                                    f"{len(rest) - offset} bytes left in the body")
            values = _from_bytes(name, rest[offset:offset + size], arg.dtype, count)
            offset += size
        else:
            if "data" not in item:
                raise ProtocolError(f"input '{name}' has no 'data'")
            values = _typed(_numbers(name, item["data"], want, count), arg.dtype)
        feeds[name] = values.reshape(shape)
    if offset != len(rest):
        raise ProtocolError(f"the body holds {len(rest) - offset} bytes that no input's binary_data_size claims")
    missing = [a.name for a in inputs if a.name not in feeds]
    if missing:
        raise ProtocolError(f"missing input '{missing[0]}' (the model's inputs are {[a.name for a in inputs]})")
    feeds = {a.name: feeds[a.name] for a in inputs}
    names, binary = _requested_outputs(doc, outputs)
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(f"'id' must be a string, got {_short(request_id)}")
    return InferRequest(feeds, names, request_id, binary)


def _requested_outputs(doc: dict, outputs: list) -> tuple:
    known = [a.name for a in outputs]
    params = doc.get("parameters") if isinstance(doc.get("parameters"), dict) else {}
    all_binary = params.get("binary_data_output") is True
    asked = doc.get("outputs")
    if asked is None:
        return None, set(known) if all_binary else set()
    if not isinstance(asked, list):
        raise ProtocolError("'outputs' must be a list of {name}")
    names, binary = [], set()
    for item in asked:
        name = item.get("name") if isinstance(item, dict) else None
        if name not in known:
            raise ProtocolError(f"unknown output {name!r}; the model's outputs are {known}")
        if name not in names:
            names.append(name)
        out_params = item.get("parameters") or {}
        if all_binary or (isinstance(out_params, dict) and out_params.get("binary_data") is True):
            binary.add(name)
    return names, binary


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _host_array(value) -> np.ndarray:
    """An output (numpy, or a torch tensor on any device) as a numpy array (BF16 as float32 values)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        value = value.numpy()
    return np.ascontiguousarray(value)


def encode_infer_response(model_name: str, request: InferRequest, outputs: list) -> tuple:
    """``(body bytes, headers)`` of an infer response; ``outputs``: ``[(name, DType, value)]``. JSON,
    or Triton's binary form when ``request.binary`` names an output."""
    tensors, blobs = [], []
    for name, dtype, value in outputs:
        datatype = kserve_datatype(dtype, f"output '{name}'")
        if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16 and name in request.binary:
            raw = value.detach().cpu().contiguous().view(torch.int16).numpy().astype("<i2").tobytes()
            shape = list(value.shape)
        else:
            array = _host_array(value)
            shape = list(array.shape)
            raw = array.astype(array.dtype.newbyteorder("<")).tobytes() if name in request.binary else None
        entry = {"name": name, "datatype": datatype, "shape": shape}
        if raw is None:
            entry["data"] = array.reshape(-1).tolist()
        else:
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        tensors.append(entry)
    doc = {"model_name": model_name, "model_version": "1", "outputs": tensors}
    if request.id is not None:
        doc["id"] = request.id
    header = json.dumps(doc, separators=(",", ":")).encode()  # NaN/Infinity as Python's json writes them
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream",
                                      HEADER_LENGTH: str(len(header))}


def error_body(message: str) -> bytes:
    """KServe's error response: ``{"error": message}``."""
    return json.dumps({"error": message}).encode()
