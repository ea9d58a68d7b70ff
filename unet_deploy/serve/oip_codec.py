"""The bodies of the Open Inference Protocol (KServe v2 REST, ``inference_rest.md``) with its binary tensor data
extension, read and written apart from the server:

* a request body is a JSON header, followed -- when the ``Inference-Header-Content-Length`` header says where
  the JSON ends -- by the raw bytes of each input whose ``parameters.binary_data_size`` says so, in the order
  of the inputs (little-endian; a BYTES element is a 4-byte length and its bytes);
* a body may come with ``Content-Encoding: gzip`` or ``deflate``: :func:`inflate` writes it out a chunk at a
  time and stops at a limit (a gzip bomb is a 413 after ``limit`` bytes, never a full inflation);
* :func:`encode_response` writes an answer: each output's ``data`` in the JSON, or for an output asked in
  binary, its bytes after the JSON header.

Every fault of a body is an :class:`~unet_deploy.serve.decode.HTTPError` 400 with one line.
"""

from __future__ import annotations

import io
import json
import math
import struct
import tempfile
import zlib
from dataclasses import dataclass
from typing import IO, Any, cast

import numpy as np

from unet_deploy.serve.decode import HTTPError
from unet_deploy.serve.upload import SPOOL_BYTES

__all__ = ["NUMERIC", "InputTensor", "InferRequest", "FileSlice", "header_length", "read_request",
           "numeric_array", "bytes_elements", "inflate", "encode_response", "ENCODINGS"]

#: the numeric datatypes of the protocol and their little-endian numpy types (BYTES is separate; no BF16)
NUMERIC = {"BOOL": "|b1", "UINT8": "|u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "|i1",
           "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
#: the request ``Content-Encoding`` values read (``identity`` or none: the body as it is)
ENCODINGS = ("gzip", "x-gzip", "deflate")
_CHUNK = 64 * 1024
_MAX_NESTING = 8  #: list levels of a JSON ``data`` (a tensor of rank 8 at most)


@dataclass(frozen=True)
class InputTensor:
    """One input of a request: its ``data`` from the JSON, or where its bytes are in the body."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Any = None  #: the JSON ``data`` (None when binary)
    binary: tuple[int, int] | None = None  #: (offset, size) of its bytes in the body

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    def describe(self) -> str:
        return f"{self.datatype} {list(self.shape)}"


@dataclass(frozen=True)
class InferRequest:
    """A parsed ``infer`` request (its binary data still in the body)."""

    id: str | None
    parameters: dict[str, Any]
    inputs: list[InputTensor]
    outputs: dict[str, bool] | None  #: the outputs asked for -> in binary; None: not said (the defaults)
    binary_output: bool  #: ``parameters.binary_data_output``: every output in binary


class FileSlice(io.RawIOBase):
    """Bytes ``[start, start + size)`` of a seekable file, as a file of their own (seeks the shared file on
    every read: one reader at a time)."""

    def __init__(self, file: IO[bytes], start: int, size: int):
        super().__init__()
        self.file, self.start, self.size, self.pos = file, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.size - self.pos)
        if n <= 0:
            return 0
        self.file.seek(self.start + self.pos)
        data = self.file.read(n)
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


def _bad(message: str) -> HTTPError:
    return HTTPError(400, message)


def header_length(value: str | None, size: int) -> int:
    """The JSON header's length: ``Inference-Header-Content-Length`` (``value``), else the whole body."""
    if value is None:
        return size
    if not value.strip().isdigit() or int(value) > size:
        raise _bad(f"Inference-Header-Content-Length {value[:20]!r}: give the JSON header's length in bytes, at most "
                   f"the body's {size:,}")
    return int(value)


def _load_json(text: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _bad(f"malformed JSON in the request: {str(e).splitlines()[0][:120]}") from None
    if not isinstance(obj, dict):
        raise _bad("the request's JSON must be an object with 'inputs'")
    return obj


def _shape(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > _MAX_NESTING or \
            not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise _bad(f"input '{name}': 'shape' must be a list of at most {_MAX_NESTING} dimensions >= 0")
    return tuple(value)


def _parameters(item: dict[str, Any], what: str) -> dict[str, Any]:
    parameters = item.get("parameters", {})
    if not isinstance(parameters, dict):
        raise _bad(f"{what}: 'parameters' must be an object")
    return parameters


def _input(item: Any, offset: int, end: int) -> tuple[InputTensor, int]:
    """One entry of ``inputs`` (and the offset of the next input's binary data)."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise _bad("each input must be an object with 'name', 'datatype', 'shape' and 'data' (or binary_data_size)")
    name = item["name"]
    datatype = item.get("datatype")
    if datatype != "BYTES" and datatype not in NUMERIC:
        raise _bad(f"input '{name}': datatype {datatype!r} is not one of the protocol's ({', '.join(NUMERIC)}, "
                   "BYTES)")
    shape = _shape(item.get("shape"), name)
    size = _parameters(item, f"input '{name}'").get("binary_data_size")
    if size is None:
        if "data" not in item:
            raise _bad(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
        return InputTensor(name, datatype, shape, data=item["data"]), offset
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _bad(f"input '{name}': binary_data_size must be a number of bytes")
    if offset + size > end:
        raise _bad(f"input '{name}': binary_data_size {size:,} goes past the end of the body ({end - offset:,} "
                   "bytes of binary data left after the JSON header): the body is truncated or "
                   "Inference-Header-Content-Length is wrong")
    return InputTensor(name, datatype, shape, binary=(offset, size)), offset + size


def _outputs(obj: dict[str, Any]) -> dict[str, bool] | None:
    """``outputs``: name -> whether it goes in binary (``binary_data``, else ``binary_data_output``)."""
    given = obj.get("outputs")
    if given is None:
        return None
    default = _parameters(obj, "the request").get("binary_data_output", False) is True
    if not isinstance(given, list):
        raise _bad("'outputs' must be a list of objects with 'name'")
    asked: dict[str, bool] = {}
    for item in given:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise _bad("'outputs' must be a list of objects with 'name'")
        parameters = _parameters(item, f"output '{item['name']}'")
        if parameters.get("classification"):
            raise _bad("the classification extension is not served: ask for 'mask' or 'probabilities'")
        if item["name"] in asked:
            raise _bad(f"output '{item['name']}' is asked for twice")
        binary = parameters.get("binary_data", default)
        if not isinstance(binary, bool):
            raise _bad(f"output '{item['name']}': binary_data must be true or false")
        asked[item["name"]] = binary
    return asked


def read_request(file: IO[bytes], size: int, header: str | None) -> InferRequest:
    """The request in a body of ``size`` bytes (``header``: its ``Inference-Header-Content-Length``)."""
    length = header_length(header, size)
    file.seek(0)
    obj = _load_json(file.read(length))
    inputs = obj.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _bad("the request has no 'inputs': send a list with one input, 'image' or 'pixels'")
    parsed, offset = [], length
    for item in inputs:
        tensor, offset = _input(item, offset, size)
        parsed.append(tensor)
    if offset != size:
        raise _bad(f"{size - offset:,} bytes after the JSON header belong to no input: binary_data_size and "
                   "Inference-Header-Content-Length must account for the whole body")
    if len({t.name for t in parsed}) != len(parsed):
        raise _bad("an input name appears twice")
    request_id = obj.get("id")
    parameters = _parameters(obj, "the request")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise _bad("binary_data_output must be true or false")
    return InferRequest(request_id if isinstance(request_id, str) else None, parameters, parsed, _outputs(obj),
                        binary_output)


def _flatten(data: Any, depth: int = 0) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    if depth >= _MAX_NESTING:
        raise _bad(f"'data' is nested more than {_MAX_NESTING} levels deep")
    if not any(isinstance(x, list) for x in data):
        return data
    return [y for x in data for y in _flatten(x, depth + 1)]


def numeric_array(file: IO[bytes], tensor: InputTensor) -> np.ndarray:
    """A numeric input as an array of its datatype and shape (from the body's bytes or the JSON ``data``)."""
    dtype = np.dtype(NUMERIC[tensor.datatype])
    if tensor.binary is not None:
        offset, size = tensor.binary
        if size != tensor.count * dtype.itemsize:
            raise _bad(f"input '{tensor.name}': {size:,} bytes of binary data, but {tensor.describe()} takes "
                       f"{tensor.count * dtype.itemsize:,}")
        file.seek(offset)
        return np.frombuffer(file.read(size), dtype).reshape(tensor.shape)
    values = _flatten(tensor.data)
    if len(values) != tensor.count:
        raise _bad(f"input '{tensor.name}': 'data' has {len(values):,} values, its shape {list(tensor.shape)} "
                   f"takes {tensor.count:,}")
    if not all(isinstance(v, (int, float)) for v in values):
        raise _bad(f"input '{tensor.name}': 'data' must hold numbers only")
    try:
        return np.asarray(values, dtype).reshape(tensor.shape)
    except (ValueError, OverflowError) as e:
        raise _bad(f"input '{tensor.name}': {str(e)[:120]}") from None


def bytes_elements(file: IO[bytes], tensor: InputTensor) -> list[IO[bytes]]:
    """The elements of a BYTES input, each as a file: slices of the body, or the JSON strings (UTF-8)."""
    if tensor.binary is None:
        values = _flatten(tensor.data)
        if len(values) != tensor.count or not all(isinstance(v, str) for v in values):
            raise _bad(f"input '{tensor.name}': 'data' must hold {tensor.count} strings (send files as binary data: "
                       "JSON strings carry UTF-8 text only)")
        return [io.BytesIO(v.encode("utf-8")) for v in values]
    offset, size = tensor.binary
    end, out = offset + size, list[IO[bytes]]()
    for i in range(tensor.count):
        file.seek(offset)
        head = file.read(4)
        if len(head) < 4 or offset + 4 > end:
            raise _bad(f"input '{tensor.name}': its binary data ends before element {i + 1} of {tensor.count}")
        (length,) = struct.unpack("<I", head)
        if offset + 4 + length > end:
            raise _bad(f"input '{tensor.name}': element {i + 1} is {length:,} bytes, past the end of its binary "
                       "data (truncated?)")
        out.append(cast(IO[bytes], FileSlice(file, offset + 4, length)))  # a binary file, as IO[bytes] is
        offset += 4 + length
    if offset != end:
        raise _bad(f"input '{tensor.name}': {end - offset:,} bytes of binary data after its {tensor.count} elements")
    return out


def _wbits(encoding: str, head: bytes) -> int:
    if encoding != "deflate":
        return 16 + zlib.MAX_WBITS
    zlib_header = len(head) == 2 and head[0] & 0x0F == 8 and (head[0] << 8 | head[1]) % 31 == 0
    return zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS  # RFC 1950 as HTTP says, or bare RFC 1951


def inflate(source: IO[bytes], encoding: str, limit: int) -> tuple[IO[bytes], int]:
    """A ``gzip`` or ``deflate`` body, inflated into a spooled file a chunk at a time: (file, size).

    Raises:
        HTTPError: 413 once more than ``limit`` bytes come out (nothing beyond is inflated); 400 for a broken
            or truncated stream, or bytes after its end.
    """
    source.seek(0)
    head = source.read(2)
    source.seek(0)
    stream = zlib.decompressobj(_wbits(encoding, head))
    out = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 - the caller closes it
    total = 0
    try:
        while not stream.eof and (chunk := source.read(_CHUNK)):
            while chunk and not stream.eof:
                piece = stream.decompress(chunk, _CHUNK)
                total += len(piece)
                if total > limit:
                    raise HTTPError(413, f"the {encoding} body inflates to more than {limit:,} bytes "
                                         "(--max-upload-mb)", {"Connection": "close"})
                out.write(piece)
                chunk = stream.unconsumed_tail
        if not stream.eof:
            raise _bad(f"truncated {encoding} body: the stream ends early")
        if stream.unused_data or source.read(1):
            raise _bad(f"bytes after the end of the {encoding} stream (one stream per body)")
    except zlib.error as e:
        out.close()
        raise _bad(f"broken {encoding} body: {e}") from None
    except BaseException:
        out.close()
        raise
    return out, total


def encode_response(model: str, version: str, request_id: str | None,
                    outputs: list[tuple[str, str, np.ndarray, bool]]) -> tuple[bytes, int | None]:
    """An ``infer`` answer: (body, the JSON header's length when binary outputs follow it, else None).

    Args:
        model: the model's name.
        version: its version.
        request_id: the request's ``id``, echoed.
        outputs: (name, datatype, array, in binary) of each output, in order.
    """
    header: dict[str, Any] = {"model_name": model, "model_version": version}
    if request_id is not None:
        header["id"] = request_id
    entries, chunks = [], []
    for name, datatype, array, binary in outputs:
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            raw = np.ascontiguousarray(array, np.dtype(NUMERIC[datatype])).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.ravel().tolist()
        entries.append(entry)
    header["outputs"] = entries
    text = json.dumps(header, separators=(",", ":")).encode()
    if not chunks:
        return text, None
    return b"".join([text, *chunks]), len(text)
