"""Verifies a saved model version before anything uses it.

A version directory is only trusted after :func:`check`: a file damaged on disk (flash
wear, a power cut during a copy, a hand edit) or a training run that diverged into NaN
must be refused when choosing the champion, a warm start or a rollback target, not found
out later as a crash or as NaN scores that never alarm.

Runs in the daemon process, which must stay lean, so it uses the standard library only:
``model.onnx`` is read with a minimal protobuf wire-format reader, not ``onnx``/numpy.
"""

from __future__ import annotations

import hashlib
import math
import struct
import sys
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from .common.modelmeta import METADATA, MODEL, FileEntry, MetaError, ModelMeta, load

# onnx.TensorProto.DataType values whose values can be non-finite.
FLOAT, FLOAT16, DOUBLE = 1, 10, 11
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


class _Problem(Exception):
    """What is wrong with one file of the version."""

    def __init__(self, file: str, what: str):
        super().__init__(f"{file}: {what}")


class _Invalid(Exception):
    """model.onnx does not parse as protobuf."""


def check(directory: Path) -> str | None:
    """None if the version in `directory` is whole and usable; else ONE line naming the file
    and what is wrong, e.g. "v000003/model.onnx: sha256 does not match metadata.json"."""
    try:
        _check(directory)
    except _Problem as e:
        # Named by its version even when reached through the `current` link.
        return f"{directory.resolve().name}/{e}"
    return None


def _check(directory: Path) -> None:
    meta = _metadata(directory / METADATA)
    model = b""
    for name, entry in sorted(meta.files.items()):
        data = _verified(directory, name, entry)
        if name == MODEL:
            model = data
    try:
        _check_onnx(model)
    except _Invalid as e:
        raise _Problem(MODEL, f"not a valid ONNX model ({e})") from None


def _metadata(path: Path) -> ModelMeta:
    """metadata.json, every field checked (modelmeta): its numbers finite and in range,
    its file list plain names."""
    try:
        return load(path)
    except FileNotFoundError:
        raise _Problem(METADATA, "missing") from None
    except MetaError as e:
        raise _Problem(METADATA, str(e)) from None


def _verified(directory: Path, name: str, entry: FileEntry) -> bytes:
    """The content of a listed file, if its size and sha256 are those in metadata.json."""
    path = directory / name
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise _Problem(name, "not a regular file")
        # Sizes first: a truncated file is named as such, and a damaged metadata.json
        # cannot make us read more than it claims.
        if size != entry.bytes:
            raise _Problem(
                name, f"{size} bytes, metadata.json says {entry.bytes} (truncated or damaged)"
            )
        data = path.read_bytes()
    except FileNotFoundError:
        raise _Problem(name, "missing (listed in metadata.json)") from None
    except OSError as e:
        raise _Problem(name, f"unreadable ({e.strerror})") from None
    if hashlib.sha256(data).hexdigest() != entry.sha256.lower():
        raise _Problem(name, "sha256 does not match metadata.json (file damaged)")
    return data


# --- model.onnx: just enough protobuf to reach the initializers.


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise _Invalid("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise _Invalid("varint longer than 10 bytes")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of each field of one message: an int for a varint,
    the bytes (a memoryview) for fixed64, fixed32 and length-delimited fields."""
    pos, end = 0, len(buf)
    while pos < end:
        start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Invalid(f"field number 0 at byte {start}")
        if wire == 0:
            value, pos = _varint(buf, pos)
        else:
            if wire == 1:
                size = 8
            elif wire == 5:
                size = 4
            elif wire == 2:
                size, pos = _varint(buf, pos)
            else:  # 3/4: groups, never in ONNX; 6/7 do not exist
                raise _Invalid(f"wire type {wire} at byte {start}")
            if pos + size > end:
                raise _Invalid(f"field {number} at byte {start} runs past the end")
            value, pos = buf[pos : pos + size], pos + size
        yield number, wire, value


def _expect(number: int, wire: int, wires: tuple[int, ...]) -> None:
    if wire not in wires:
        raise _Invalid(f"field {number} has wire type {wire}")


class _Tensor(NamedTuple):
    """An initializer as read from model.onnx; `values` None for non-float types."""

    name: str
    data_type: int
    dims: list[int]
    values: Sequence[float] | None
    external: bool


def _check_onnx(data: bytes) -> None:
    """Every initializer stored in the file, and every float one finite."""
    tensors = _initializers(data)
    if not tensors:
        raise _Problem(MODEL, "graph has no initializers (no weights)")
    for t in tensors:
        if t.external:
            raise _Problem(MODEL, f"initializer {t.name} has external data (never written here)")
        if t.values is not None and not all(map(math.isfinite, t.values)):
            i = next(i for i, v in enumerate(t.values) if not math.isfinite(v))
            what = f"a non-finite weight ({t.values[i]} at index {i})"
            raise _Problem(MODEL, f"initializer {t.name} has {what}")


def _initializers(data: bytes) -> list[_Tensor]:
    """ModelProto.graph (7) -> GraphProto.initializer (5), decoded; raises _Invalid if
    `data` is not such a protobuf."""
    graphs = []
    for number, wire, value in _fields(memoryview(data)):
        if number == 7:
            _expect(number, wire, (2,))
            graphs.append(value)
    if not graphs:
        raise _Invalid("no graph")
    tensors = []
    for graph in graphs:  # protobuf merges repeats of a message field
        for number, wire, value in _fields(graph):
            if number == 5:
                _expect(number, wire, (2,))
                tensors.append(_tensor(value, len(tensors)))
    return tensors


_ITEM = {FLOAT: ("f", 4), DOUBLE: ("d", 8), FLOAT16: ("e", 2)}


def _tensor(buf: memoryview, index: int) -> _Tensor:
    """One TensorProto; its float values must be as many as its dims say."""
    dims: list[int] = []
    data_type = 0
    name = f"#{index}"
    raw: bytes | None = None
    typed = bytearray()  # float_data/double_data as packed little-endian bytes
    halves: list[int] = []  # int32_data: where FLOAT16 values go when not raw
    external = False
    for number, wire, value in _fields(buf):
        if number == 1:  # dims: int64, packed or not
            dims += _varints(number, wire, value)
        elif number == 2:
            _expect(number, wire, (0,))
            data_type = value
        elif number == 4:  # float_data
            _expect(number, wire, (2, 5))
            typed += value
        elif number == 5:  # int32_data
            halves += _varints(number, wire, value)
        elif number == 8:
            _expect(number, wire, (2,))
            name = bytes(value).decode("utf-8", "replace")
        elif number == 9:
            _expect(number, wire, (2,))
            raw = bytes(value)
        elif number == 10:  # double_data
            _expect(number, wire, (1, 2))
            typed += value
        elif number == 13:  # external_data
            external = True
        elif number == 14:  # data_location
            _expect(number, wire, (0,))
            external = external or value == _EXTERNAL
    if external or data_type not in _ITEM:
        return _Tensor(name, data_type, dims, None, external)
    code, size = _ITEM[data_type]
    count = math.prod(dims)
    if any(h > 0xFFFF for h in halves):
        raise _Invalid(f"initializer {name} has a float16 beyond 16 bits")
    if raw is None:
        raw = struct.pack(f"<{len(halves)}H", *halves) if data_type == FLOAT16 else bytes(typed)
    elif typed or halves:
        raise _Invalid(f"initializer {name} has both raw_data and typed data")
    if len(raw) != count * size:
        raise _Invalid(
            f"initializer {name} holds {len(raw)} bytes, its dims {dims} need {count * size}"
        )
    if code == "e":  # array has no half floats
        values: Sequence[float] = [v for (v,) in struct.iter_unpack("<e", raw)]
    else:
        values = array(code, raw)
        if sys.byteorder == "big":  # ONNX stores little-endian
            values.byteswap()
    return _Tensor(name, data_type, dims, values, external)


def _varints(number: int, wire: int, value: Any) -> list[int]:
    """A repeated integer field's values: one varint, or packed varints."""
    _expect(number, wire, (0, 2))
    if wire == 0:
        return [value]
    out, pos = [], 0
    while pos < len(value):
        v, pos = _varint(value, pos)
        out.append(v)
    return out
