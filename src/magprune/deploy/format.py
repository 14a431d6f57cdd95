"""Deploy room (file format): pruned models saved small, loaded back exactly.

File format (safetensors, version 2; version 1 files still load). Every tensor of the state_dict is stored under
``<name>/<part>`` in one of:

- ``dense``: ``<name>/dense``, the tensor as it is;
- ``csr``: ``<name>/values`` (nonzeros, original dtype), ``<name>/indptr`` and ``<name>/cols`` in the smallest
  unsigned integer types that hold them; the tensor is viewed as 2-D ``(shape[0], prod(shape[1:]))``;
- ``rel4``: ``<name>/values`` and ``<name>/codes``, 4-bit relative indices packed two per byte (Deep Compression's
  relative indexing): over the flattened tensor, code ``c < 15`` skips ``c`` zeros and then takes the next value,
  code ``15`` skips 15 zeros and takes nothing.

- ``shared`` (version 3): a tensor whose nonzeros take at most 256 distinct values (after weight sharing,
  :mod:`magprune.deploy.quantize`) as Deep Compression stores it, in one uint8 part ``<name>/shared``: the
  codebook, the relative indices (a few bits each, filler entries where a gap overflows) and the codebook indices,
  both entropy-coded; see :mod:`magprune.deploy.entropy`. Its metadata adds ``shared``: {index_bits, values,
  gaps, bytes, coders}. Version 3 stores ``params`` (below) as deflated
  JSON in a uint8 tensor ``__params__`` with its crc32 in the header (``params_crc32``).

Then, as Deep Compression's last stage entropy-codes its indices, a part that deflate (zlib) shrinks by at least 5%
is stored deflated, as uint8 bytes, and listed under ``deflated`` with its dtype and shape (version 2). The index
arrays of a trained network compress well (runs of dead input pixels), fp32 values by ~10%.

The header metadata holds ``format``, ``format_version`` and ``params``: a JSON object name -> {encoding, shape,
dtype, nnz, crc32, deflated} (crc32 of every stored part as stored, so a flipped byte is refused). Each tensor takes
whichever encoding is smallest. Loading rebuilds the exact tensors; safetensors refuses sparse tensors, hence the
plain arrays.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from magprune.deploy.entropy import EncodingError, SharedWeight, decode_shared, encode_shared
from magprune.fileio import write_atomic

FORMAT = "magprune-compressed"
FORMAT_VERSION = 3
_READABLE_VERSIONS = ("1", "2", "3")
DEFLATE_MIN_SAVING = 0.05  # store a part deflated when that saves at least this fraction of it
_ENCODINGS = ("dense", "csr", "rel4", "shared")
PARAMS_TENSOR = "__params__"  # version 3: where the per-tensor metadata is stored
MAX_NUMEL = 1 << 36  # a tensor larger than this in a file is refused rather than allocated


class CompressedFormatError(ValueError):
    """A compressed file is unreadable, corrupt, or does not fit the model it is loaded into."""


# ----------------------------------------------------------------------------------------------- encodings
def smallest_uint(max_value: int) -> np.dtype:
    """The narrowest unsigned integer dtype holding ``0..max_value``."""
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_value <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"{max_value} does not fit in 64 bits")


def as_numpy(tensor: Tensor) -> np.ndarray:
    return tensor.detach().cpu().contiguous().numpy()


def _storable(tensor: Tensor) -> np.ndarray:
    """The tensor as a numpy array; bfloat16, which numpy lacks, as its 16-bit patterns (an exact round trip)."""
    if tensor.dtype == torch.bfloat16:
        return as_numpy(tensor.view(torch.int16))
    return as_numpy(tensor)


def _as_2d(array: np.ndarray) -> np.ndarray:
    rows = array.shape[0] if array.ndim else 1
    return array.reshape(rows, -1) if array.size else array.reshape(rows, 0)


def encode_csr(array: np.ndarray) -> dict[str, np.ndarray]:
    """CSR of ``array`` viewed as 2-D, with the narrowest index types that fit."""
    matrix = _as_2d(array)
    rows, cols = np.nonzero(matrix)
    indptr = np.zeros(matrix.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=matrix.shape[0]), out=indptr[1:])
    return {"values": matrix[rows, cols].copy(),
            "indptr": indptr.astype(smallest_uint(int(indptr[-1]))),
            "cols": cols.astype(smallest_uint(max(matrix.shape[1] - 1, 0)))}


def encode_rel4(array: np.ndarray) -> dict[str, np.ndarray]:
    """4-bit relative indices (two per byte) and the nonzero values of ``array`` in row-major order."""
    flat = array.reshape(-1)
    positions = np.flatnonzero(flat)
    gaps = np.diff(positions, prepend=-1) - 1
    skips, last = np.divmod(gaps, 15)
    # each nonzero is preceded by `skips` codes of 15 and then its own code `last`
    counts = skips + 1
    codes = np.full(int(counts.sum()), 15, dtype=np.uint8)
    codes[np.cumsum(counts) - 1] = last
    if codes.size % 2:
        codes = np.append(codes, np.uint8(15))  # padding: a skip that takes nothing
    return {"values": flat[positions].copy(), "codes": (codes[0::2] << 4 | codes[1::2]).astype(np.uint8)}


def _decode_rel4_positions(codes_packed: np.ndarray) -> np.ndarray:
    codes = np.empty(codes_packed.size * 2, dtype=np.int64)
    codes[0::2] = codes_packed >> 4
    codes[1::2] = codes_packed & 15
    takes = codes < 15
    ends = np.cumsum(np.where(takes, codes + 1, 15))
    return ends[takes] - 1


def _encoded_size(parts: Mapping[str, np.ndarray]) -> int:
    return sum(part.nbytes for part in parts.values())


def _deflated(parts: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """The parts as stored: each deflated (uint8 bytes) where that saves >= DEFLATE_MIN_SAVING, with a record of the
    original dtype and shape of those."""
    stored, deflated = {}, {}
    for part, array in parts.items():
        array = np.require(array, requirements="C")  # not ascontiguousarray: that turns a 0-d array 1-d
        packed = zlib.compress(array.tobytes(), 6)
        if len(packed) <= (1 - DEFLATE_MIN_SAVING) * array.nbytes:
            stored[part] = np.frombuffer(packed, dtype=np.uint8)
            deflated[part] = {"dtype": array.dtype.str, "shape": list(array.shape)}
        else:
            stored[part] = array
    return stored, deflated


def encode(tensor: Tensor) -> tuple[str, dict[str, np.ndarray]]:
    """The smallest encoding of ``tensor``: ``(encoding, {part: array})``."""
    array = _storable(tensor)
    best: tuple[str, dict[str, np.ndarray]] = ("dense", {"dense": array})
    if array.ndim >= 2 and array.size:
        for name, encoder in (("csr", encode_csr), ("rel4", encode_rel4)):
            parts = encoder(array)
            if _encoded_size(parts) < _encoded_size(best[1]):
                best = (name, parts)
    return best


# ----------------------------------------------------------------------------------------------- files
def _state_dict(source: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    return dict(source.state_dict() if isinstance(source, nn.Module) else source)


def _compress(source: nn.Module | Mapping[str, Tensor]) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """The arrays to store (``<name>/<part>``) and the per-tensor metadata of the compressed format."""
    arrays: dict[str, np.ndarray] = {}
    params: dict[str, dict] = {}
    for name, tensor in _state_dict(source).items():
        if not isinstance(tensor, Tensor) or tensor.is_sparse or tensor.layout != torch.strided:
            raise TypeError(f"{name}: only dense tensors can be saved, got {type(tensor).__name__}")
        encoding, parts = encode(tensor)
        shared = _shared_encoding(tensor, parts)
        stored, deflated = _deflated(parts) if shared is None else (shared[0], {})
        if shared is not None:
            encoding, parts = "shared", shared[0]
        params[name] = {"encoding": encoding, "shape": list(tensor.shape), "dtype": str(tensor.dtype),
                        "nnz": int(parts["values"].size) if "values" in parts else int(tensor.numel()),
                        "crc32": {part: zlib.crc32(a.tobytes()) for part, a in stored.items()},
                        "stored_bytes": _encoded_size(stored), "nonzero": int(tensor.count_nonzero())}
        if deflated:
            params[name]["deflated"] = deflated
        if shared is not None:
            params[name]["nnz"] = shared[1]["nnz"]
            params[name]["shared"] = {k: v for k, v in shared[1].items() if k != "nnz"}
        arrays.update({f"{name}/{part}": a for part, a in stored.items()})
    return arrays, params


def save_compressed(source: nn.Module | Mapping[str, Tensor], path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None) -> dict[str, dict]:
    """Write a model (or state_dict) in the compressed format, atomically; returns the per-tensor metadata.

    ``metadata`` adds string entries to the header (``magprune export`` records the model's registry name there).
    """
    from safetensors.numpy import save

    arrays, params = _compress(source)
    header = {**(metadata or {}), "format": FORMAT, "format_version": str(FORMAT_VERSION)}
    arrays[PARAMS_TENSOR], header["params_crc32"] = _params_blob(params)
    write_atomic(Path(path), save(arrays, metadata=header))
    return params


def _params_blob(params: Mapping[str, dict]) -> tuple[np.ndarray, str]:
    """Version 3 keeps the per-tensor metadata as deflated JSON in a tensor of its own, not as a string in the
    header (where every quote is escaped): a quarter of its size, which is 5% of a LeNet-300-100 file."""
    packed = zlib.compress(json.dumps(params, separators=(",", ":")).encode(), 9)
    return np.frombuffer(packed, dtype=np.uint8), str(zlib.crc32(packed))


def _read_params(path: Path, arrays: dict[str, np.ndarray], metadata: Mapping[str, str]) -> dict:
    """The per-tensor metadata: the header's ``params`` (versions 1-2) or the deflated tensor (version 3)."""
    if "params" in metadata:
        return json.loads(metadata["params"])
    blob = arrays.pop(PARAMS_TENSOR, None)
    if blob is None or blob.dtype != np.uint8 or blob.ndim != 1:
        raise _fail(path, f"neither a 'params' header entry nor a uint8 {PARAMS_TENSOR!r} tensor")
    if str(zlib.crc32(blob.tobytes())) != metadata.get("params_crc32"):
        raise _fail(path, f"checksum mismatch in {PARAMS_TENSOR!r} (file is corrupt)")
    try:
        return json.loads(zlib.decompress(blob.tobytes()))
    except zlib.error as error:
        raise _fail(path, f"{PARAMS_TENSOR!r} is not deflated JSON ({error})") from error


def _fail(path: Path, message: str) -> CompressedFormatError:
    return CompressedFormatError(f"{path}: {message}")


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise _fail(path, "no such file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            arrays = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as error:  # safetensors raises its own error types for truncated or garbled files
        raise _fail(path, f"not a readable safetensors file ({error})") from error
    return arrays, metadata


_DTYPES = {str(dtype): dtype for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                                            torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


def _decode_param(path: Path, name: str, meta: Mapping, arrays: Mapping[str, np.ndarray],
                  expand_shared: bool = True) -> Tensor | SharedWeight:
    encoding = meta.get("encoding")
    if encoding not in _ENCODINGS:
        raise _fail(path, f"{name}: unknown encoding {encoding!r}, expected one of {list(_ENCODINGS)}")
    shape = tuple(int(s) for s in meta["shape"])
    numel = math.prod(shape)
    dtype = _DTYPES.get(meta["dtype"])
    if dtype is None:
        raise _fail(path, f"{name}: unsupported dtype {meta['dtype']!r}")
    needed = {"dense": ("dense",), "csr": ("values", "indptr", "cols"), "rel4": ("values", "codes"),
              "shared": ("shared",)}[encoding]
    parts = {}
    for part in needed:
        key = f"{name}/{part}"
        if key not in arrays:
            raise _fail(path, f"{name}: missing tensor {key!r}")
        parts[part] = arrays[key]
        crc = zlib.crc32(np.ascontiguousarray(parts[part]).tobytes())
        if crc != meta["crc32"].get(part):
            raise _fail(path, f"{name}: checksum mismatch in {key!r} (file is corrupt)")
        if part in meta.get("deflated", {}):
            parts[part] = _inflate(path, key, parts[part], meta["deflated"][part])
    if encoding == "dense":
        dense = parts["dense"]
        if dense.shape != shape and not (shape == () and dense.shape == (1,)):  # 0-d, as earlier versions wrote it 1-d
            raise _fail(path, f"{name}: stored shape {list(dense.shape)} != recorded {list(shape)}")
        return _to_tensor(dense.reshape(shape).copy(), dtype)
    if encoding == "shared":
        return _decode_shared_param(path, name, meta, parts, shape, dtype, expand_shared)
    values = parts["values"]
    if values.ndim != 1 or values.size != meta["nnz"]:
        raise _fail(path, f"{name}: {values.size} values stored, metadata says nnz={meta['nnz']}")
    out = np.zeros(numel, dtype=values.dtype)
    if encoding == "csr":
        rows = shape[0] if shape else 1
        width = numel // rows if rows else 0
        indptr, cols = parts["indptr"].astype(np.int64), parts["cols"].astype(np.int64)
        if (indptr.size != rows + 1 or indptr[0] != 0 or indptr[-1] != values.size or np.any(np.diff(indptr) < 0)
                or cols.size != values.size or (cols.size and cols.max() >= width)):
            raise _fail(path, f"{name}: CSR indices do not fit shape {list(shape)}")
        row_of = np.repeat(np.arange(rows), np.diff(indptr))
        out[row_of * width + cols] = values
    else:
        positions = _decode_rel4_positions(parts["codes"])
        if positions.size != values.size or (positions.size and positions[-1] >= numel):
            raise _fail(path, f"{name}: relative indices give {positions.size} positions for {values.size} values "
                              f"in {numel} elements")
        out[positions] = values
    return _to_tensor(out.reshape(shape), dtype)


def _to_tensor(array: np.ndarray, dtype: torch.dtype) -> Tensor:
    if dtype == torch.bfloat16 and array.dtype == np.int16:  # stored as its bit patterns
        return torch.from_numpy(array).view(torch.bfloat16)
    return torch.from_numpy(array).to(dtype)


def _shared_encoding(tensor: Tensor, parts: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict] | None:
    """The ``shared`` parts and metadata of a weight (2-D or more) whose nonzeros take at most 256 values, if they
    are smaller than the best other encoding's ``parts``; else None."""
    if tensor.ndim < 2 or not tensor.numel() or not tensor.is_floating_point() or tensor.dtype == torch.bfloat16:
        return None  # bfloat16 (no numpy dtype) is stored by its bit patterns in the other encodings
    found = encode_shared(as_numpy(tensor))
    if found is None or _encoded_size(found[0]) >= _encoded_size(parts):
        return None
    return found


def _decode_shared_param(path: Path, name: str, meta: Mapping, parts: Mapping[str, np.ndarray],
                         shape: tuple[int, ...], dtype: torch.dtype, expand: bool = True) -> Tensor | SharedWeight:
    numel = math.prod(shape)
    if numel > MAX_NUMEL:
        raise _fail(path, f"{name}: shape {list(shape)} has {numel} entries, more than this reader accepts")
    if parts["shared"].dtype != np.uint8:
        raise _fail(path, f"{name}: shared part stored as {parts['shared'].dtype}, expected uint8")
    try:
        shared = decode_shared(parts["shared"], as_numpy(torch.zeros(0, dtype=dtype)).dtype,
                               {**meta["shared"], "nnz": meta["nnz"]}, shape)
    except EncodingError as error:
        raise _fail(path, f"{name}: {error}") from error
    return torch.from_numpy(shared.dense()) if expand else shared


def _inflate(path: Path, key: str, packed: np.ndarray, record: Mapping) -> np.ndarray:
    dtype, shape = np.dtype(record["dtype"]), tuple(int(s) for s in record["shape"])
    if dtype.kind not in "fiub" or packed.dtype != np.uint8:
        raise _fail(path, f"{key}: cannot inflate a {packed.dtype} part into {dtype}")
    try:
        raw = zlib.decompress(packed.tobytes())
    except zlib.error as error:
        raise _fail(path, f"{key}: deflated data is corrupt ({error})") from error
    if len(raw) != dtype.itemsize * math.prod(shape):
        raise _fail(path, f"{key}: inflates to {len(raw)} bytes, expected {list(shape)} of {dtype}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def load_compressed(path: str | os.PathLike, *, expand_shared: bool = True) -> dict[str, Tensor]:
    """Read a compressed file back into a state_dict of exact tensors; corrupt files raise CompressedFormatError.

    ``expand_shared=False``: tensors of the ``shared`` encoding come back unexpanded, as
    :class:`~magprune.deploy.entropy.SharedWeight` (what :mod:`magprune.deploy.quantized` builds its layers from)."""
    path = Path(path)
    arrays, metadata = _read(path)
    if metadata.get("format") != FORMAT:
        raise _fail(path, f"not a magprune compressed file (format={metadata.get('format')!r})")
    if metadata.get("format_version") not in _READABLE_VERSIONS:
        raise _fail(path, f"format_version {metadata.get('format_version')!r} is not supported "
                          f"(this magprune reads {', '.join(_READABLE_VERSIONS)})")
    try:
        params = _read_params(path, arrays, metadata)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _fail(path, f"metadata 'params' is not JSON ({error})") from error
    if not isinstance(params, dict):
        raise _fail(path, f"metadata 'params' is a {type(params).__name__}, not an object")
    expected = {f"{name}/{part}" for name, meta in params.items() for part in meta.get("crc32", {})}
    if set(arrays) != expected:
        raise _fail(path, f"stored tensors do not match the metadata: unexpected {sorted(set(arrays) - expected)}, "
                          f"missing {sorted(expected - set(arrays))}")
    try:
        return {name: _decode_param(path, name, meta, arrays, expand_shared) for name, meta in params.items()}
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, CompressedFormatError):
            raise
        raise _fail(path, f"malformed metadata ({error!r})") from error


def load_compressed_into(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a compressed file into ``model`` (names and shapes must match exactly); returns the model."""
    state = load_compressed(path)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise _fail(Path(path), f"does not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}")
    for name, tensor in state.items():
        if tuple(own[name].shape) != tuple(tensor.shape):
            raise _fail(Path(path), f"{name}: file has shape {list(tensor.shape)}, "
                                    f"{type(model).__name__} expects {list(own[name].shape)}")
    model.load_state_dict(state, strict=True)
    return model


@dataclass(frozen=True)
class SizeRow:
    name: str
    shape: tuple[int, ...]
    density: float
    encoding: str
    dense_bytes: int
    compressed_bytes: int

    @property
    def ratio(self) -> float:
        return self.dense_bytes / max(self.compressed_bytes, 1)


def size_report(source: nn.Module | Mapping[str, Tensor]) -> list[SizeRow]:
    """Per tensor: dense bytes (in the tensor's own dtype) vs the compressed format's payload bytes (the file adds a
    small JSON header); an encoding marked ``+z`` has parts stored deflated."""
    return size_report_from_params(_compress(source)[1])


def size_report_from_params(params: Mapping[str, Mapping]) -> list[SizeRow]:
    """The rows of :func:`size_report` from the metadata :func:`save_compressed` returned (no second encoding)."""
    rows = []
    for name, meta in params.items():
        shape = tuple(int(s) for s in meta["shape"])
        numel = math.prod(shape)
        rows.append(SizeRow(name, shape, meta["nonzero"] / numel if numel else 1.0,
                            meta["encoding"] + ("+z" if meta.get("deflated") else ""), _itemsize(meta["dtype"]) * numel,
                            int(meta["stored_bytes"])))
    return rows


def _itemsize(dtype: str) -> int:
    known = _DTYPES.get(dtype)
    return known.itemsize if known is not None else 4


def format_size_report(rows: list[SizeRow], file_bytes: int | None = None) -> str:
    lines = [f"{'tensor':<24} {'shape':<18} {'density':>8} {'encoding':>8} {'dense':>11} {'compressed':>11} "
             f"{'ratio':>7}"]
    for r in rows:
        lines.append(f"{r.name:<24} {'x'.join(map(str, r.shape)):<18} {r.density:>8.3f} {r.encoding:>8} "
                     f"{r.dense_bytes:>11,} {r.compressed_bytes:>11,} {r.ratio:>6.1f}x")
    dense, comp = sum(r.dense_bytes for r in rows), sum(r.compressed_bytes for r in rows)
    lines.append(f"{'total (payload)':<61} {dense:>11,} {comp:>11,} {dense / max(comp, 1):>6.1f}x")
    if file_bytes is not None:
        lines.append(f"{'total (file incl. header)':<61} {dense:>11,} {file_bytes:>11,} {dense / file_bytes:>6.1f}x")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- Deep Compression table
@dataclass(frozen=True)
class SharedRow:
    """One row of Deep Compression's per-layer table (their Tables 2-3) for a tensor of a compressed file."""

    name: str
    weights: int
    kept: float  # fraction of entries nonzero
    weight_bits: int | None  # bits per codebook index before entropy coding (None: not shared)
    weight_bits_coded: float | None  # stored bits per nonzero of the coded index stream
    index_bits: int | None  # bits per relative index before entropy coding
    index_bits_coded: float | None  # stored bits per nonzero of the coded gaps (fillers included)
    stored_bytes: int
    dense_bytes: int

    @property
    def ratio(self) -> float:
        return self.dense_bytes / max(self.stored_bytes, 1)


def shared_rows(params: Mapping[str, Mapping]) -> list[SharedRow]:
    """The rows of Deep Compression's table from the metadata :func:`save_compressed` returned."""
    rows = []
    for name, meta in params.items():
        shape = tuple(int(s) for s in meta["shape"])
        numel = math.prod(shape)
        shared = meta.get("shared")
        nnz = max(int(meta["nnz"]), 1)
        if shared:
            gap_bytes, index_bytes = shared["bytes"]
            row = SharedRow(name, numel, meta["nonzero"] / max(numel, 1),
                            max(int(shared["values"] - 1).bit_length(), 1), 8 * index_bytes / nnz,
                            int(shared["index_bits"]), 8 * gap_bytes / nnz, int(meta["stored_bytes"]), 4 * numel)
        else:
            row = SharedRow(name, numel, meta["nonzero"] / max(numel, 1), None, None, None, None,
                            int(meta["stored_bytes"]), 4 * numel)
        rows.append(row)
    return rows


def format_shared_table(rows: list[SharedRow], file_bytes: int | None = None) -> str:
    """Deep Compression's per-layer table as Markdown: weights, % kept, weight and index bits (as quantized /
    as stored after entropy coding), bytes and compression against dense fp32; then the totals."""
    def bits(nominal: int | None, coded: float | None) -> str:
        return "-" if nominal is None else f"{nominal} / {coded:.2f}"

    lines = ["| layer | weights | % kept | weight bits (P+Q / +H) | index bits (P+Q / +H) | bytes | compression |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r.name} | {r.weights:,} | {100 * r.kept:.1f}% | {bits(r.weight_bits, r.weight_bits_coded)} | "
                     f"{bits(r.index_bits, r.index_bits_coded)} | {r.stored_bytes:,} | {r.ratio:.1f}x |")
    dense = sum(r.dense_bytes for r in rows)
    payload = sum(r.stored_bytes for r in rows)
    weights = sum(r.weights for r in rows)
    kept = sum(r.kept * r.weights for r in rows) / max(weights, 1)
    lines.append(f"| total (payload) | {weights:,} | {100 * kept:.1f}% | | | {payload:,} | "
                 f"{dense / max(payload, 1):.1f}x |")
    if file_bytes is not None:
        lines.append(f"| file (with header) | | | | | {file_bytes:,} | {dense / max(file_bytes, 1):.1f}x |")
    return "\n".join(lines)
