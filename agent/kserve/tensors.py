"""KServe v2 tensors <-> numpy arrays, for both transports.

The Open Inference Protocol carries a tensor in one of two forms: typed values
(JSON `data` over REST, `InferTensorContents` over gRPC) or raw bytes (the
binary tensor data extension over REST, `raw_input_contents` /
`raw_output_contents` over gRPC). Raw bytes are the same on both transports:
numeric tensors row-major little-endian, BOOL one byte per element, BYTES each
element as a 4-byte little-endian length then its bytes. This module turns both
forms into arrays and back, and says precisely what is wrong with a tensor that
does not add up; the transports turn `TensorError` into their own error
convention (400 JSON, INVALID_ARGUMENT).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from agent.kserve import TensorError

if TYPE_CHECKING:  # numpy is imported by the functions that make or read arrays, so the REST routes and
    import numpy as np  # the datatype tables cost nothing in an agent that serves no tensor model

#: KServe v2 datatype -> numpy dtype name.
V2_TO_NUMPY: dict[str, str] = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
    "UINT64": "uint64", "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64", "BYTES": "object",
}
NUMPY_TO_V2: dict[str, str] = {v: k for k, v in V2_TO_NUMPY.items()}


def v2_datatype(array: np.ndarray) -> str:
    """The v2 datatype of an array (strings and bytes are BYTES)."""
    if array.dtype.kind in "OSU":
        return "BYTES"
    try:
        return NUMPY_TO_V2[array.dtype.name]
    except KeyError:
        raise TensorError(f"numpy dtype {array.dtype.name} has no KServe v2 datatype") from None


def check_header(name: Any, datatype: Any, shape: Any, where: str) -> tuple[str, str, list[int]]:
    """Validate a tensor's name, datatype and shape; `where` says which tensor it is."""
    if not isinstance(name, str) or not name:
        raise TensorError(f"{where}.name must be a non-empty string")
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise TensorError(f"input '{name}': shape must be a list of non-negative integers")
    if not isinstance(datatype, str) or datatype not in V2_TO_NUMPY:
        raise TensorError(f"input '{name}': unknown datatype {datatype!r}; one of {', '.join(V2_TO_NUMPY)}")
    return name, datatype, [int(d) for d in shape]


def element_count(name: str, shape: Sequence[int], limit: int) -> int:
    """Elements in `shape`, refused past `limit` before anything is allocated."""
    count = 1
    for dim in shape:
        count *= dim
        if count > limit:
            raise TensorError(f"input '{name}': shape {list(shape)} holds more than {limit} values")
    return math.prod(shape)


def from_values(name: str, datatype: str, shape: Sequence[int], values: Any) -> np.ndarray:
    """An array from typed values (JSON `data`, gRPC typed contents), checked against shape."""
    import numpy as np

    dtype = V2_TO_NUMPY[datatype]
    try:
        if datatype == "BYTES":
            items = list(values)
            array = np.empty(len(items), dtype=object)
            array[:] = [v if isinstance(v, bytes) else str(v).encode("utf-8") if isinstance(v, str)
                        else _not_bytes(name, v) for v in items]
        else:
            array = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TensorError(f"input '{name}': data is not {datatype}: {exc}") from None
    expected = math.prod(shape)
    if array.size != expected:
        raise TensorError(f"input '{name}': shape {list(shape)} holds {expected} values, data has {array.size}")
    return array.reshape(shape)


def _not_bytes(name: str, value: Any) -> bytes:
    raise TensorError(f"input '{name}': a BYTES element must be a string, got {type(value).__name__}")


def from_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes | memoryview) -> np.ndarray:
    """An array from raw tensor bytes, which must hold exactly shape x datatype."""
    import numpy as np

    count = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_from_raw(name, shape, count, memoryview(raw))
    itemsize = np.dtype(V2_TO_NUMPY[datatype]).itemsize
    if len(raw) != count * itemsize:
        raise TensorError(
            f"input '{name}': {len(raw)} bytes of binary data, but shape {list(shape)} of {datatype} "
            f"needs {count * itemsize}"
        )
    dtype = np.dtype(V2_TO_NUMPY[datatype]).newbyteorder("<")
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    if datatype == "BOOL" and array.size and array.view(np.uint8).max() > 1:
        raise TensorError(f"input '{name}': BOOL bytes must be 0 or 1")
    return array.astype(dtype.newbyteorder("="), copy=False)


def _bytes_from_raw(name: str, shape: Sequence[int], count: int, raw: memoryview) -> np.ndarray:
    import numpy as np

    items: list[bytes] = []
    offset, end = 0, len(raw)
    while offset < end:
        if len(items) == count:
            raise TensorError(f"input '{name}': binary data holds more than the {count} BYTES elements "
                              f"of shape {list(shape)}")
        if offset + 4 > end:
            raise TensorError(f"input '{name}': BYTES element {len(items)} has a truncated length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > end:
            raise TensorError(f"input '{name}': BYTES element {len(items)} says {length} bytes, "
                              f"only {end - offset} follow")
        items.append(bytes(raw[offset:offset + length]))
        offset += length
    if len(items) != count:
        raise TensorError(f"input '{name}': shape {list(shape)} holds {count} BYTES elements, "
                          f"binary data has {len(items)}")
    array = np.empty(count, dtype=object)
    array[:] = items
    return array.reshape(shape)


def to_raw(array: np.ndarray) -> bytes:
    """Raw tensor bytes of an array: row-major little-endian, BYTES length-prefixed."""
    import numpy as np

    if array.dtype.kind in "OSU":
        parts: list[bytes] = []
        for item in array.ravel():
            data = item if isinstance(item, bytes) else str(item).encode("utf-8")
            parts.append(struct.pack("<I", len(data)))
            parts.append(data)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def to_values(array: np.ndarray) -> Any:
    """Row-major typed values: numeric arrays as they are (orjson writes them), others as lists;
    BYTES elements that are valid UTF-8 as strings."""
    if array.dtype.kind in "biuf" and array.dtype.name != "float16":
        return array.ravel()
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in array.ravel().tolist()]


def bounded_count(name: str, shape: Sequence[int], limit: int) -> int:
    """Elements in `shape`, refused past `limit` before anything is allocated.

    Unlike `element_count`, zero dimensions do not hide the others: numpy cannot
    even describe a [0, 10**20] array, so such a shape must be refused here rather
    than fail later as an internal error."""
    nonzero = 1
    for dim in shape:
        nonzero *= dim or 1
        if nonzero > limit:
            raise TensorError(f"input '{name}': shape {list(shape)} holds more than {limit} values")
    return math.prod(shape)


def raw_itemsize(datatype: str) -> int | None:
    """Bytes per element in the raw form, or None for BYTES, whose elements vary in length."""
    import numpy as np

    if datatype == "BYTES":
        return None
    return np.dtype(V2_TO_NUMPY[datatype]).itemsize
