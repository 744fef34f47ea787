"""Tiny ONNX models written out by hand (the `onnx` package is not a dependency), for
datatypes the demo model does not take: FP16, BOOL, BYTES."""

from __future__ import annotations

from pathlib import Path


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value: int | str | bytes) -> bytes:
    """One protobuf field: a varint, or length-delimited bytes / string / message."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def identity_onnx(tensors: dict[str, int]) -> bytes:
    """ModelProto with one Identity node per input `<name>` -> `<name>_out`, each 1-D of any length.
    `tensors` maps names to ONNX element types (FLOAT16 10, STRING 8, BOOL 9)."""

    def value_info(name: str, elem_type: int) -> bytes:
        shape = _field(1, _field(2, "n"))  # one dimension named "n" (free)
        return _field(1, name) + _field(2, _field(1, _field(1, elem_type) + _field(2, shape)))

    graph = b"".join(_field(1, _field(1, n) + _field(2, f"{n}_out") + _field(4, "Identity")) for n in tensors)
    graph += _field(2, "identity")
    graph += b"".join(_field(11, value_info(n, t)) for n, t in tensors.items())
    graph += b"".join(_field(12, value_info(f"{n}_out", t)) for n, t in tensors.items())
    return _field(1, 8) + _field(7, graph) + _field(8, _field(1, "") + _field(2, 17))  # IR 8, opset 17


def identity_bundle(directory: Path) -> Path:
    """A tensor bundle `identity` (version "1"): inputs `half` FP16, `flag` BOOL, `text` BYTES (an ONNX
    string), each 1-D, returned unchanged as `<name>_out`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.onnx").write_bytes(identity_onnx({"half": 10, "flag": 9, "text": 8}))
    (directory / "model.toml").write_text('format = "onnx"\nfile = "model.onnx"\ntask = "tensor"\nversion = "1"\n')
    return directory
