"""Sparse room: the compressed file format, sparse inference modules, and ``sparsify``.

File format (safetensors, version 2; version 1 files still load). Every tensor of the state_dict is stored under
``<name>/<part>`` in one of:

- ``dense``: ``<name>/dense``, the tensor as it is;
- ``csr``: ``<name>/values`` (nonzeros, original dtype), ``<name>/indptr`` and ``<name>/cols`` in the smallest
  unsigned integer types that hold them; the tensor is viewed as 2-D ``(shape[0], prod(shape[1:]))``;
- ``rel4``: ``<name>/values`` and ``<name>/codes``, 4-bit relative indices packed two per byte (Deep Compression's
  relative indexing): over the flattened tensor, code ``c < 15`` skips ``c`` zeros and then takes the next value,
  code ``15`` skips 15 zeros and takes nothing.

Then, as Deep Compression's last stage entropy-codes its indices, a part that deflate (zlib) shrinks by at least 5%
is stored deflated, as uint8 bytes, and listed under ``deflated`` with its dtype and shape (version 2). The index
arrays of a trained network compress well (runs of dead input pixels), fp32 values by ~10%.

The header metadata holds ``format``, ``format_version`` and ``params``: a JSON object name -> {encoding, shape,
dtype, nnz, crc32, deflated} (crc32 of every stored part as stored, so a flipped byte is refused). Each tensor takes
whichever encoding is smallest. Loading rebuilds the exact tensors; safetensors refuses sparse tensors, hence the
plain arrays.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from magprune._io import write_atomic
from magprune._simd import CSRProduct

FORMAT = "magprune-compressed"
FORMAT_VERSION = 2
_READABLE_VERSIONS = ("1", "2")
DEFLATE_MIN_SAVING = 0.05  # store a part deflated when that saves at least this fraction of it
_ENCODINGS = ("dense", "csr", "rel4")


class CompressedFormatError(ValueError):
    """A compressed file is unreadable, corrupt, or does not fit the model it is loaded into."""


# ----------------------------------------------------------------------------------------------- encodings
def smallest_uint(max_value: int) -> np.dtype:
    """The narrowest unsigned integer dtype holding ``0..max_value``."""
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_value <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"{max_value} does not fit in 64 bits")


def _as_numpy(tensor: Tensor) -> np.ndarray:
    return tensor.detach().cpu().contiguous().numpy()


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
        array = np.ascontiguousarray(array)
        packed = zlib.compress(array.tobytes(), 6)
        if len(packed) <= (1 - DEFLATE_MIN_SAVING) * array.nbytes:
            stored[part] = np.frombuffer(packed, dtype=np.uint8)
            deflated[part] = {"dtype": array.dtype.str, "shape": list(array.shape)}
        else:
            stored[part] = array
    return stored, deflated


def encode(tensor: Tensor) -> tuple[str, dict[str, np.ndarray]]:
    """The smallest encoding of ``tensor``: ``(encoding, {part: array})``."""
    array = _as_numpy(tensor)
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
        stored, deflated = _deflated(parts)
        params[name] = {"encoding": encoding, "shape": list(tensor.shape), "dtype": str(tensor.dtype),
                        "nnz": int(parts["values"].size) if "values" in parts else int(tensor.numel()),
                        "crc32": {part: zlib.crc32(a.tobytes()) for part, a in stored.items()},
                        "stored_bytes": _encoded_size(stored), "nonzero": int(tensor.count_nonzero())}
        if deflated:
            params[name]["deflated"] = deflated
        arrays.update({f"{name}/{part}": a for part, a in stored.items()})
    return arrays, params


def save_compressed(source: nn.Module | Mapping[str, Tensor], path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None) -> dict[str, dict]:
    """Write a model (or state_dict) in the compressed format, atomically; returns the per-tensor metadata.

    ``metadata`` adds string entries to the header (``magprune export`` records the model's registry name there).
    """
    from safetensors.numpy import save

    arrays, params = _compress(source)
    header = {**(metadata or {}), "format": FORMAT, "format_version": str(FORMAT_VERSION),
              "params": json.dumps(params)}
    write_atomic(Path(path), save(arrays, metadata=header))
    return params


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


def _decode_param(path: Path, name: str, meta: Mapping, arrays: Mapping[str, np.ndarray]) -> Tensor:
    encoding = meta.get("encoding")
    if encoding not in _ENCODINGS:
        raise _fail(path, f"{name}: unknown encoding {encoding!r}, expected one of {list(_ENCODINGS)}")
    shape = tuple(int(s) for s in meta["shape"])
    numel = math.prod(shape)
    dtype = _DTYPES.get(meta["dtype"])
    if dtype is None:
        raise _fail(path, f"{name}: unsupported dtype {meta['dtype']!r}")
    needed = {"dense": ("dense",), "csr": ("values", "indptr", "cols"), "rel4": ("values", "codes")}[encoding]
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
        if parts["dense"].shape != shape:
            raise _fail(path, f"{name}: stored shape {list(parts['dense'].shape)} != recorded {list(shape)}")
        return torch.from_numpy(parts["dense"].copy()).to(dtype)
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
    return torch.from_numpy(out.reshape(shape)).to(dtype)


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


def load_compressed(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a compressed file back into a state_dict of exact tensors; corrupt files raise CompressedFormatError."""
    path = Path(path)
    arrays, metadata = _read(path)
    if metadata.get("format") != FORMAT:
        raise _fail(path, f"not a magprune compressed file (format={metadata.get('format')!r})")
    if metadata.get("format_version") not in _READABLE_VERSIONS:
        raise _fail(path, f"format_version {metadata.get('format_version')!r} is not supported "
                          f"(this magprune reads {', '.join(_READABLE_VERSIONS)})")
    try:
        params = json.loads(metadata["params"])
    except (KeyError, json.JSONDecodeError) as error:
        raise _fail(path, f"metadata 'params' is missing or not JSON ({error})") from error
    expected = {f"{name}/{part}" for name, meta in params.items() for part in meta.get("crc32", {})}
    if set(arrays) != expected:
        raise _fail(path, f"stored tensors do not match the metadata: unexpected {sorted(set(arrays) - expected)}, "
                          f"missing {sorted(expected - set(arrays))}")
    try:
        return {name: _decode_param(path, name, meta, arrays) for name, meta in params.items()}
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
    """Per tensor: dense fp32 bytes vs the compressed format's payload bytes (the file adds a small JSON header);
    an encoding marked ``+z`` has parts stored deflated."""
    return size_report_from_params(_compress(source)[1])


def size_report_from_params(params: Mapping[str, Mapping]) -> list[SizeRow]:
    """The rows of :func:`size_report` from the metadata :func:`save_compressed` returned (no second encoding)."""
    rows = []
    for name, meta in params.items():
        shape = tuple(int(s) for s in meta["shape"])
        numel = math.prod(shape)
        rows.append(SizeRow(name, shape, meta["nonzero"] / numel if numel else 1.0,
                            meta["encoding"] + ("+z" if meta.get("deflated") else ""), 4 * numel,
                            int(meta["stored_bytes"])))
    return rows


def format_size_report(rows: list[SizeRow], file_bytes: int | None = None) -> str:
    lines = [f"{'tensor':<24} {'shape':<18} {'density':>8} {'encoding':>8} {'dense fp32':>11} {'compressed':>11} "
             f"{'ratio':>7}"]
    for r in rows:
        lines.append(f"{r.name:<24} {'x'.join(map(str, r.shape)):<18} {r.density:>8.3f} {r.encoding:>8} "
                     f"{r.dense_bytes:>11,} {r.compressed_bytes:>11,} {r.ratio:>6.1f}x")
    dense, comp = sum(r.dense_bytes for r in rows), sum(r.compressed_bytes for r in rows)
    lines.append(f"{'total (payload)':<61} {dense:>11,} {comp:>11,} {dense / max(comp, 1):>6.1f}x")
    if file_bytes is not None:
        lines.append(f"{'total (file incl. header)':<61} {dense:>11,} {file_bytes:>11,} {dense / file_bytes:>6.1f}x")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- inference
def _csr_arrays(weight2d: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    parts = encode_csr(_as_numpy(weight2d.float()))
    if parts["indptr"][-1] >= 2**31:
        raise ValueError(f"a layer with {int(parts['indptr'][-1]):,} nonzeros is beyond the sparse kernels' 32-bit "
                         "row pointers; keep it dense")
    # int32 row pointers: the kernels index with them on every row
    return parts["indptr"].astype(np.int32), parts["cols"], np.ascontiguousarray(parts["values"], dtype=np.float32)


def _spmm(product: CSRProduct, bias: np.ndarray, x2d: np.ndarray) -> np.ndarray:
    """y = x W^T + b for x of shape (batch, in), batch >= 2 (one example goes to the matrix-vector kernel);
    returns (batch, out)."""
    batch, n_in = x2d.shape
    threads = torch.get_num_threads()
    # y^T = W x^T, the batch cut into blocks of at most 32 columns (a multiple of 8, padded with zeros)
    width = 32 if batch > 32 else -(-batch // 8) * 8
    blocks = -(-batch // width)
    x = torch.from_numpy(x2d)
    if blocks * width != batch:
        x = torch.cat([x, x.new_zeros(blocks * width - batch, n_in)])
    xb = x.view(blocks, width, n_in).transpose(1, 2).contiguous().numpy()  # torch copies with its threads
    outb = np.empty((blocks, product.n_rows, width), dtype=np.float32)
    outb[:] = bias[:, None]
    product.matmul(xb, outb, threads)
    return outb.transpose(0, 2, 1).reshape(blocks * width, product.n_rows)[:batch]


def _check_input(module: nn.Module, x: Tensor) -> None:
    if x.dtype != torch.float32 or not x.is_cpu:
        raise TypeError(f"{type(module).__name__} runs on float32 CPU tensors, got {x.dtype} on {x.device}")
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{type(module).__name__} is for inference: call it under torch.no_grad() or "
                           "torch.inference_mode() (it has no backward)")


BACKENDS = ("simd", "torch")


class SparseLinear(nn.Module):
    """Drop-in inference replacement for ``nn.Linear`` with the weight held in CSR (narrow column indices).

    ``backend="simd"`` (default) runs the SIMD CSR kernels of ``magprune._simd`` on torch's thread count (rows
    split over threads; batches use y^T = W x^T in blocks of up to 32 columns, so each nonzero multiplies one
    contiguous input row held in cache). ``backend="torch"`` runs ``torch.addmm`` with a ``torch.sparse_csr``
    weight (int32 indices, built on first use): slower on large layers, but with less per-call overhead, so
    faster on small ones at larger batches; :func:`sparsify` measures both.
    float32 CPU only, no autograd. Not scriptable by ``torch.jit`` nor exportable by ``torch.export``
    (the kernel is outside torch); convert to dense with :meth:`to_dense` for those.
    """

    def __init__(self, linear: nn.Linear, backend: str = "simd") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.indptr, self.cols, self.vals = _csr_arrays(linear.weight.detach())
        self.product = CSRProduct(self.indptr, self.cols, self.vals, self.in_features) if backend == "simd" else None
        if self.product is not None:  # one copy of the arrays: the product's (on huge pages if large)
            self.cols, self.vals = self.product.cols, self.product.vals
        self._torch_csr: Tensor | None = None
        bias = linear.bias.detach() if linear.bias is not None else torch.zeros(self.out_features)
        self.bias_array = _as_numpy(bias.float()).copy()
        self.has_bias = linear.bias is not None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_torch_csr"] = None  # rebuilt on first use: sparse CSR tensors do not deepcopy
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.product is not None:  # the product re-homed its arrays when it was restored: share them again
            self.cols, self.vals = self.product.cols, self.product.vals

    def _torch_forward(self, x2d: Tensor) -> Tensor:
        if self._torch_csr is None:
            import warnings

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                self._torch_csr = torch.sparse_csr_tensor(
                    torch.from_numpy(self.indptr.astype(np.int32)), torch.from_numpy(self.cols.astype(np.int32)),
                    torch.from_numpy(self.vals), (self.out_features, self.in_features), check_invariants=True)
                self._torch_bias = torch.from_numpy(self.bias_array)[:, None]
        return torch.addmm(self._torch_bias, self._torch_csr, x2d.T).T  # F.linear fails under inference_mode

    @property
    def density(self) -> float:
        return self.vals.size / max(self.in_features * self.out_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(self, x)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear expects last dim {self.in_features}, got shape {list(x.shape)}")
        lead = x.shape[:-1]
        if self.backend == "torch":
            return self._torch_forward(x.reshape(-1, self.in_features)).reshape(*lead, self.out_features)
        # as few torch calls as possible: a large layer usually runs after others have evicted the cache, and each
        # torch call then costs 5-25 us of misses (~60 us in all before, on a 0.9 ms batch-1 product)
        if math.prod(lead) == 1:  # one example: the kernel reads x in place
            if not x.is_contiguous():
                x = x.contiguous()
            out = self.bias_array.copy()
            self.product.matvec_at(x.data_ptr(), out, torch.get_num_threads())
            return torch.from_numpy(out.reshape(*lead, self.out_features))
        x2d = (x.detach() if x.requires_grad else x).numpy().reshape(-1, self.in_features)
        y = _spmm(self.product, self.bias_array, x2d)
        return torch.from_numpy(np.ascontiguousarray(y).reshape(*lead, self.out_features))

    def to_dense(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.has_bias)
        weight = np.zeros((self.out_features, self.in_features), dtype=np.float32)
        rows = np.repeat(np.arange(self.out_features), np.diff(self.indptr.astype(np.int64)))
        weight[rows, self.cols.astype(np.int64)] = self.vals
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(weight))
            if self.has_bias:
                linear.bias.copy_(torch.from_numpy(self.bias_array))
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, density={self.density:.3f}, "
                f"backend={self.backend!r}")


class SparseConv2d(nn.Module):
    """Inference replacement for ``nn.Conv2d`` (groups=1, zero padding).

    At stride 1 without dilation it convolves directly: each nonzero weight (c, kh, kw) multiplies a shifted row of
    the padded input, no im2col (the column index becomes an offset into the image, one product per input size,
    cached). Other strides and dilations go through ``F.unfold`` and the CSR x dense kernel.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("SparseConv2d supports groups=1, zero padding given as integers")
        self.out_channels, self.kernel_size = conv.out_channels, conv.kernel_size
        self.in_channels = conv.in_channels
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        weight = conv.weight.detach()
        self.indptr, self.cols, self.vals = _csr_arrays(weight.reshape(weight.shape[0], -1))
        self.direct = self.stride == (1, 1) and self.dilation == (1, 1)
        # the im2col product only for the strides that need it; the direct one is built per input size
        self.product = None if self.direct else CSRProduct(self.indptr, self.cols, self.vals, weight[0].numel())
        self._direct: dict[tuple[int, int], CSRProduct] = {}
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(self.out_channels)
        self.bias_array = _as_numpy(bias.float()).copy()
        self.density = self.vals.size / max(weight.numel(), 1)

    def _direct_product(self, padded_h: int, padded_w: int) -> CSRProduct:
        key = (padded_h, padded_w)
        if key not in self._direct:
            kh, kw = self.kernel_size
            flat = self.cols.astype(np.int64)
            channel, rest = np.divmod(flat, kh * kw)
            row, col = np.divmod(rest, kw)
            offsets = channel * padded_h * padded_w + row * padded_w + col  # still ascending within each row
            image = self.in_channels * padded_h * padded_w
            self._direct[key] = CSRProduct(self.indptr, offsets.astype(smallest_uint(image)), self.vals, image,
                                           tile_rows=max(image, 1))
        return self._direct[key]

    def forward(self, x: Tensor) -> Tensor:
        _check_input(self, x)
        batch, _, height, width = x.shape
        out_h = (height + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        out_w = (width + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        if self.direct:
            return self._forward_direct(x, out_h, out_w)
        positions = out_h * out_w
        padded = -(-positions // 8) * 8  # the kernels take the output positions 8 at a time
        patches = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        if padded != positions:
            patches = F.pad(patches, (0, padded - positions))
        out = np.empty((batch, self.out_channels, padded), dtype=np.float32)
        out[:] = self.bias_array[None, :, None]
        self.product.matmul(_as_numpy(patches), out, torch.get_num_threads())
        return torch.from_numpy(out[:, :, :positions]).reshape(batch, self.out_channels, out_h, out_w)

    def _forward_direct(self, x: Tensor, out_h: int, out_w: int) -> Tensor:
        batch = x.shape[0]
        padded_h, padded_w = x.shape[2] + 2 * self.padding[0], x.shape[3] + 2 * self.padding[1]
        w8 = -(-out_w // 8) * 8
        image = self.in_channels * padded_h * padded_w
        # the padded batch, flat, with a tail: the last rows' vector loads run up to w8 - 1 floats past the image
        flat = np.zeros(batch * image + w8, dtype=np.float32)
        flat[:batch * image].reshape(batch, self.in_channels, padded_h, padded_w)[
            :, :, self.padding[0]:self.padding[0] + x.shape[2], self.padding[1]:self.padding[1] + x.shape[3]] = \
            _as_numpy(x)
        out = np.empty((batch, self.out_channels, out_h, w8), dtype=np.float32)
        out[:] = self.bias_array[None, :, None, None]
        self._direct_product(padded_h, padded_w).conv_rows(flat, out, out_h, padded_w, torch.get_num_threads())
        return torch.from_numpy(np.ascontiguousarray(out[..., :out_w]) if w8 != out_w else out)


@dataclass(frozen=True)
class SparsifyDecision:
    name: str
    kind: str
    density: float
    dense_ms: float
    sparse_ms: float
    converted: bool
    backend: str = "simd"

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms


def _best_ms(fn, repeats: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def _layer_inputs(model: nn.Module, example_input: Tensor | None) -> dict[str, tuple[int, ...]]:
    if example_input is None:
        return {}
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            shapes.setdefault(name, tuple(inputs[0].shape[1:]))
        return hook

    hooks = [m.register_forward_hook(recorder(n)) for n, m in model.named_modules()
             if isinstance(m, nn.Linear | nn.Conv2d)]
    try:
        with torch.no_grad():
            model(example_input[:1])
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def sparsify(model: nn.Module, *, batch_size: int = 1, example_input: Tensor | None = None,
             max_density: float = 0.5, min_speedup: float = 1.2, repeats: int = 5) -> nn.Module:
    """A copy of ``model`` whose Linear (and Conv2d) layers run sparse where that is measured to be faster.

    Each candidate layer (density <= ``max_density``) is timed dense vs sparse on random input of ``batch_size``
    rows (a Linear with both sparse backends, the faster one kept), and converted only when the sparse module is at
    least ``min_speedup`` times faster, so a converted layer should never be slower than dense. Conv2d layers are
    considered only when ``example_input`` is given (their spatial size comes from it). The decisions are on the
    returned model as ``sparsify_decisions``.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not 0.0 < max_density <= 1.0:
        raise ValueError(f"max_density must be a fraction of weights kept in (0, 1], got {max_density!r}")
    model = copy.deepcopy(model).eval()
    input_shapes = _layer_inputs(model, example_input)
    decisions = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            shape: tuple[int, ...] = (batch_size, module.in_features)
            sparse_cls: type[nn.Module] = SparseLinear
        elif isinstance(module, nn.Conv2d) and name in input_shapes and module.groups == 1 \
                and module.padding_mode == "zeros" and not isinstance(module.padding, str):
            shape, sparse_cls = (batch_size, *input_shapes[name]), SparseConv2d
        else:
            continue
        density = float((module.weight != 0).float().mean())
        if density > max_density:
            decisions.append(SparsifyDecision(name, type(module).__name__, density, math.nan, math.nan, False))
            continue
        candidates = [sparse_cls(module)]
        if sparse_cls is SparseLinear:
            candidates.append(SparseLinear(module, backend="torch"))
        x = torch.randn(shape)
        with torch.inference_mode():
            dense_ms = _best_ms(lambda m=module, x=x: m(x), repeats)
            sparse_ms, sparse = min(((_best_ms(lambda m=c, x=x: m(x), repeats), c) for c in candidates),
                                    key=lambda timed: timed[0])
        converted = dense_ms >= min_speedup * sparse_ms
        decisions.append(SparsifyDecision(name, type(module).__name__, density, dense_ms, sparse_ms, converted,
                                          getattr(sparse, "backend", "simd")))
        if converted:
            model.set_submodule(name, sparse)
    model.sparsify_decisions = decisions
    return model


# ----------------------------------------------------------------------------------------------- measuring
@dataclass(frozen=True)
class BenchRow:
    name: str
    shape: str
    density: float
    batch_size: int
    dense_ms: float
    sparse_ms: float

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms


def bench_model(model: nn.Module, input_shape: tuple[int, ...], batch_sizes: tuple[int, ...] = (1, 32, 256),
                repeats: int = 10) -> list[BenchRow]:
    """Latency, dense vs sparse, of every Linear/Conv2d layer and of the whole model (sparse = every candidate
    layer sparse, i.e. ``sparsify`` with no speed test) at each batch size; best of ``repeats`` runs."""
    model = copy.deepcopy(model).eval()
    rows = []
    for batch in batch_sizes:
        x = torch.randn(batch, *input_shape)
        shapes = _layer_inputs(model, x)
        whole = sparsify(model, batch_size=batch, example_input=x, min_speedup=0.0, repeats=1)
        with torch.inference_mode():
            for name, module in model.named_modules():
                sparse = whole.get_submodule(name) if name else None
                if not isinstance(sparse, SparseLinear | SparseConv2d):
                    continue
                layer_x = torch.randn(batch, *shapes[name])
                shape = "x".join(map(str, module.weight.shape))
                rows.append(BenchRow(name, shape, sparse.density, batch,
                                     _best_ms(lambda m=module, x=layer_x: m(x), repeats),
                                     _best_ms(lambda m=sparse, x=layer_x: m(x), repeats)))
            n_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d))
            n_kept = sum(int(m.weight.count_nonzero()) for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d))
            rows.append(BenchRow("(whole model)", "x".join(map(str, (batch, *input_shape))), n_kept / n_weights,
                                 batch, _best_ms(lambda x=x: model(x), repeats),
                                 _best_ms(lambda x=x, m=whole: m(x), repeats)))
    return rows


def format_bench(rows: list[BenchRow]) -> str:
    lines = [f"{'layer':<14} {'weight':<14} {'density':>7} {'batch':>5} {'dense ms':>9} {'sparse ms':>9} "
             f"{'speedup':>7} {'dense/s':>9} {'sparse/s':>9}"]
    for r in rows:
        lines.append(f"{r.name:<14} {r.shape:<14} {r.density:>7.3f} {r.batch_size:>5} {r.dense_ms:>9.3f} "
                     f"{r.sparse_ms:>9.3f} {r.speedup:>6.2f}x {1e3 * r.batch_size / r.dense_ms:>9.0f} "
                     f"{1e3 * r.batch_size / r.sparse_ms:>9.0f}")
    return "\n".join(lines)
