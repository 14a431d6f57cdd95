"""Deploy room (sparse modules): drop-in inference replacements for ``nn.Linear`` and ``nn.Conv2d`` holding CSR
weights, run by the compiled kernels of :mod:`magprune.kernels.csr`."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from magprune.deploy.format import as_numpy, encode_csr, smallest_uint
from magprune.kernels.csr import CSRProduct, block_width


def _csr_arrays(weight2d: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    parts = encode_csr(as_numpy(weight2d.float()))
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
    # y^T = W x^T, the batch cut into blocks of at most block_width() columns (a multiple of 8, padded with zeros)
    widest = block_width()
    width = widest if batch > widest else -(-batch // 8) * 8
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

    ``backend="simd"`` (default) runs the SIMD CSR kernels of ``magprune.kernels.csr`` on torch's thread count (rows
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
        self.bias_array = as_numpy(bias.float()).copy()
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
        self.bias_array = as_numpy(bias.float()).copy()
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
        self.product.matmul(as_numpy(patches), out, torch.get_num_threads())
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
            as_numpy(x)
        out = np.empty((batch, self.out_channels, out_h, w8), dtype=np.float32)
        out[:] = self.bias_array[None, :, None, None]
        self._direct_product(padded_h, padded_w).conv_rows(flat, out, out_h, padded_w, torch.get_num_threads())
        return torch.from_numpy(np.ascontiguousarray(out[..., :out_w]) if w8 != out_w else out)
