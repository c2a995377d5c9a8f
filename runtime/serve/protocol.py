"""The Open Inference Protocol's REST infer messages (KServe "v2", as Triton and MLServer speak
it), decoded to numpy and encoded back; numpy only, so it is tested without a server.

A request is JSON, or with the binary tensor extension a JSON header of
``Inference-Header-Content-Length`` bytes followed by each input's raw little-endian bytes in
the order the inputs name them (``parameters.binary_data_size``). An input's ``data`` is its
values flattened row-major (nested lists of that shape are taken too). Every problem is a
``ProtocolError`` naming the input, which the server answers with 400.
"""

from __future__ import annotations

import json

import numpy as np

#: the protocol's tensor types this server takes, and their numpy dtypes
DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
          "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
          "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
#: the numpy kinds of JSON data each input kind takes (bool, int, uint, float)
_JSON_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
MAX_ELEMENTS = 1 << 26      # one request's inputs, all together: 64M values (an int64 is 512 MB)


class ProtocolError(ValueError):
    """A request the protocol cannot decode; its message names what is wrong."""


def datatype(dtype) -> str:
    return _NAMES[np.dtype(dtype)]


def _header(body: bytes, header_length, key: str = "inputs") -> tuple[dict, memoryview]:
    if header_length is None:
        json_bytes, rest = body, memoryview(b"")
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(f"Inference-Header-Content-Length is {header_length!r}, not a "
                                "byte count") from None
        if not 0 < n <= len(body):
            raise ProtocolError(f"Inference-Header-Content-Length is {n}, but the body holds "
                                f"{len(body)} bytes")
        json_bytes, rest = body[:n], memoryview(body)[n:]
    try:
        request = json.loads(json_bytes)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"the message is not valid JSON: {e}") from None
    except RecursionError:
        raise ProtocolError("the message's JSON nests too deeply") from None
    if not isinstance(request, dict) or not isinstance(request.get(key, []), list) or (
            key == "inputs" and key not in request):
        raise ProtocolError(f'the message must be a JSON object with an "{key}" list')
    return request, rest


def _tensor(spec, rest: memoryview, pos: int, budget: int) -> tuple[str, np.ndarray, int]:
    """One input: (name, array, bytes of ``rest`` it took)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ProtocolError('each input must be an object with a "name"')
    name, kind, shape = spec["name"], spec.get("datatype"), spec.get("shape")
    if kind not in DTYPES:
        raise ProtocolError(f"input {name}: datatype {kind!r} is not one of "
                            f"{', '.join(DTYPES)}")
    if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)):
        raise ProtocolError(f"input {name}: shape must be a list of non-negative integers, "
                            f"got {shape!r}")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count > budget:
        raise ProtocolError(f"input {name}: {count} values is more than this server takes in "
                            f"one request ({MAX_ELEMENTS} in all)")
    dtype = np.dtype(DTYPES[kind]).newbyteorder("<")
    params = spec.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None:
        if type(size) is not int or size != count * dtype.itemsize:
            raise ProtocolError(f"input {name}: binary_data_size {size!r} does not hold "
                                f"{count} {kind} values ({count * dtype.itemsize} bytes)")
        if pos + size > len(rest):
            raise ProtocolError(f"input {name}: the body ends {pos + size - len(rest)} bytes "
                                "short of its binary data")
        array = np.frombuffer(rest[pos:pos + size], dtype).reshape(shape)
        return name, array.astype(dtype.newbyteorder("="), copy=False), size
    if "data" not in spec:
        raise ProtocolError(f"input {name}: neither data nor parameters.binary_data_size")
    try:
        raw = np.asarray(spec["data"])
    except ValueError as e:
        raise ProtocolError(f"input {name}: data is not a list of numbers: {e}") from None
    if raw.size != count:
        raise ProtocolError(f"input {name}: data holds {raw.size} values; shape {shape} "
                            f"needs {count}")
    # JSON's values as they are: an integer input takes integers only (1.5 is refused, not
    # truncated), within its type's range (300 is refused for UINT8, not wrapped)
    target = np.dtype(DTYPES[kind])
    if raw.size and raw.dtype.kind not in _JSON_KINDS[target.kind]:
        raise ProtocolError(f"input {name}: data is not {kind} (got {raw.dtype} values)")
    array = raw.astype(target)
    if target.kind in "iu" and raw.size and not np.array_equal(array, raw):
        raise ProtocolError(f"input {name}: data holds values out of {kind}'s range")
    return name, array.reshape(shape), 0


def decode_request(body: bytes, header_length=None) -> tuple[dict, dict[str, np.ndarray]]:
    """(the request's JSON, its inputs by name as numpy arrays)."""
    request, rest = _header(body, header_length)
    inputs, pos, budget = {}, 0, MAX_ELEMENTS
    for spec in request["inputs"]:
        try:
            name, array, used = _tensor(spec, rest, pos, budget)
        except RecursionError:      # nested data lists deeper than any tensor's rank
            raise ProtocolError("an input's data nests too deeply") from None
        if name in inputs:
            raise ProtocolError(f"input {name} is given twice")
        inputs[name] = array
        pos, budget = pos + used, budget - array.size
    if pos != len(rest):
        raise ProtocolError(f"the body holds {len(rest) - pos} bytes after the inputs' binary "
                            "data")
    return request, inputs


def _binary_wanted(request: dict, name: str) -> bool:
    """Whether the request asks for output ``name`` as binary data: per output
    (``outputs[].parameters.binary_data``), else for all (``parameters.binary_data_output``)."""
    for out in request.get("outputs") or []:
        if isinstance(out, dict) and out.get("name") == name:
            params = out.get("parameters") or {}
            if "binary_data" in params:
                return bool(params["binary_data"])
    return bool((request.get("parameters") or {}).get("binary_data_output", False))


def _spec(name: str, array: np.ndarray, binary: bool, blobs: list) -> dict:
    """A tensor's JSON: its values as ``data``, or with ``binary`` their raw little-endian
    bytes appended to ``blobs`` and counted in ``parameters.binary_data_size``."""
    array = np.ascontiguousarray(array)
    spec = {"name": name, "datatype": datatype(array.dtype), "shape": list(array.shape)}
    if binary:
        blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        spec["parameters"] = {"binary_data_size": len(blob)}
        blobs.append(blob)
    else:
        spec["data"] = array.ravel().tolist()
    return spec


def _message(header: dict, blobs: list) -> tuple[bytes, dict[str, str]]:
    """The body (the JSON, then the binary data) and ``Inference-Header-Content-Length`` when
    there is binary data."""
    text = json.dumps(header).encode()
    if not blobs:
        return text, {}
    return text + b"".join(blobs), {"Inference-Header-Content-Length": str(len(text))}


def encode_response(request: dict, model: str, version: str, outputs: dict[str, np.ndarray],
                    parameters: dict | None = None) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers (``Inference-Header-Content-Length`` when any
    output goes as binary data); ``parameters``: the response's own."""
    header = {"model_name": model, "model_version": version}
    if "id" in request:
        header["id"] = request["id"]
    if parameters:
        header["parameters"] = parameters
    blobs = []
    header["outputs"] = [_spec(name, array, _binary_wanted(request, name), blobs)
                         for name, array in outputs.items()]
    return _message(header, blobs)


def encode_request(inputs: dict[str, np.ndarray], binary: bool = True, request_id: str = "",
                   outputs: list[str] | None = None) -> tuple[bytes, dict[str, str]]:
    """A request as a client sends it (``dlrm-bench --serve``'s load generator and the tests):
    the body and its headers."""
    blobs = []
    request = {"inputs": [_spec(name, array, binary, blobs) for name, array in inputs.items()]}
    if request_id:
        request["id"] = request_id
    if outputs is not None:
        request["outputs"] = [{"name": n, "parameters": {"binary_data": binary}} for n in outputs]
    elif binary:
        request["parameters"] = {"binary_data_output": True}
    body, headers = _message(request, blobs)
    headers["Content-Type"] = "application/octet-stream" if binary else "application/json"
    return body, headers


def decode_response(body: bytes, header_length=None) -> tuple[dict, dict[str, np.ndarray]]:
    """(the response's JSON, its outputs by name): a response read as ``decode_request`` reads
    a request."""
    response, rest = _header(body, header_length, "outputs")
    if "error" in response:
        raise ProtocolError(response["error"])
    outputs, pos = {}, 0
    for spec in response.get("outputs", []):
        name, array, used = _tensor(spec, rest, pos, MAX_ELEMENTS)
        outputs[name] = array
        pos += used
    return response, outputs
