"""Core room (sparse compute): retrain pruned Linear layers computing only their kept connections.

``sparse_compute(model, pruner)`` turns every pruned ``nn.Linear`` of the pruner's targets into one whose weight is
a compact parameter ``weight_values`` (the kept entries, row-major) and whose forward, input gradient and weight
gradient run through the compiled kernels over those entries only: forward y^T = W x^T (:class:`CSRProduct`), input
gradient dx^T = W^T dy^T (a second CSR product over W's transpose), weight gradient dW at kept positions only
(:class:`SampledProduct`, an SDDMM). The optimizer then steps the kept entries only, so its cost falls with the
density too; pruned entries do not exist, so they are exactly zero and their optimizer state is clean by
construction. ``state_dict`` keys and shapes stay the plain ones (the dense ``weight`` is written and read).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from magprune import sharding
from magprune.kernels.csr import CSRProduct, padded_images, tap_offsets
from magprune.kernels.pool import Plan
from magprune.kernels.sddmm import SampledProduct
from magprune.kernels.transpose import transpose, transpose_plan
from magprune.pruner import SECOND_MOMENT_FILL, SECOND_MOMENT_KEYS, Pruner
from magprune.targets import module_name

MAX_DENSITY = 0.5  # above this a layer stays dense: the kernels' per-nonzero cost passes the dense product's
MIN_WEIGHTS = 1 << 9  # smaller layers stay dense: a sparse layer's fixed cost per call passes a tiny dense
# product's. 8192 until 2026-12-06 (a sparse layer then cost ~0.1 ms of Python and autograd per step on Zen 3); since
# its calls were cut down, LeNet-300-100's fc3 (100 x 10 at 26% kept) computed sparse made whole steps 0.5-2.4%
# faster than masked dense (interleaved, this project's Intel Xeon, 1 and 2 threads): with every pruned layer sparse
# the pruner has no gradient to mask in the step
# Convolutions up to this density are computed sparse (stride 1 directly over the padded images, else im2col):
# LeNet-5's conv2 at 12% kept, forward and both gradients, 0.52x the dense layer's time; VGG-16's 3x3 layers at
# Han's 22-35% kept 1.09-1.48x, conv5_2 at 20% 0.99x, oneDNN's dense convolution running near the cores' peak
# (benchmarks/results/rocketlake/training_convs.md: AVX-512 Intel Xeon, 2 cores; docs/training.md)
CONV_MAX_DENSITY = 0.15


def _index_dtype(n: int) -> np.dtype:
    """The narrowest unsigned dtype holding indices below ``n``."""
    return np.dtype(np.uint8 if n <= 1 << 8 else np.uint16 if n <= 1 << 16 else np.uint32)


def _columns(n: int) -> int:
    """The kernels' column count for a batch of ``n``: rounded up to a multiple of 8."""
    return -(-n // 8) * 8


def _lead(m: int) -> int:
    """Floats per row of a Linear layer's (rows, m) arrays. Up to 64 a row is one chunk of the products, read whole;
    wider rows are read in 32- or 64-column chunks and padded by 16 floats, so that a power-of-two row stride
    (m = 256: 1 KiB) does not put a chunk's rows into a few cache sets. Not measured to matter: on a flat (K, 4096)
    conv product the padding changed 9.4 ms to 8.9 ms (Zen 3, loaded machine), within noise."""
    return m if m <= 64 else m + 16


def _widest(m: int) -> int | None:
    """Chunk width of the products: a whole row up to 64 columns, else the kernels' default."""
    return 64 if m <= 64 else None


# Below this many floats the strided layout copies run in numpy on the calling thread: torch wakes its OpenMP threads
# for them (from 32K entries), which costs more than the copy on a busy machine (LeNet-300-100 at batch 64: 0.3 ms
# per copy through torch, with OMP_WAIT_POLICY=PASSIVE, on the shared 2-core machine); above it torch's blocked
# transpose is 2-3x faster than numpy's (64 x 9216: 0.9 ms against 2.7 ms on AMD Zen 3).
SERIAL_COPY_MAX = 1 << 16
SMALL_TRANSPOSE = 1 << 12  # up to this many floats a contiguous (n, f) is transposed by torch's copy in one op


def _batch_minor(a: Tensor, m: int, transposer: Plan | None = None) -> tuple[int, Tensor | None]:
    """(address, copy) of a^T as an (f, _lead(m)) float32 array of which the first m columns count, for a (n, f),
    m = _columns(n): copy is None where that is a's own memory, else the copy that holds it (keep it alive).

    The layers here return their outputs in that layout (the batch as the fast dimension: ``out[:, :n].t()``), and
    elementwise ops (ReLU, dropout) and their gradients keep it where the rows are not padded (m <= 64), so between
    two sparse layers nothing is copied; anything else (the data batch, a padded batch) is copied once, the
    columns past n zero. ``transposer``: the layer's cached transpose plan for a contiguous (n, f) with n = m and
    both multiples of 8 (the usual data batch), run on the two addresses alone: the numpy views and checks of the
    general path cost 15 us inside a LeNet-300-100 step (cold), as much as the transpose itself."""
    n, f = a.shape
    ld = _lead(m)
    if m == n and a.stride() == (1, ld) and f > 1:
        return a.data_ptr(), None  # (f, n) with rows ld apart: the kernels need only its address
    if a.stride() == (f, 1) and m == n == ld and a.numel() <= SMALL_TRANSPOSE:
        out = a.detach().t().contiguous()  # one torch op: a loss's (64, 10) gradient into the last layer took
        return out.data_ptr(), out  # 25 us inside a LeNet-300-100 step through the numpy views and ragged edges
    out = torch.empty(f, ld)
    if transposer is not None and a.stride() == (f, 1):
        transposer.run(a.data_ptr(), out.data_ptr())
        return out.data_ptr(), out
    if m != n:
        out[:, n:m] = 0.0
    if a.stride(1) == 1 and a.stride(0) >= f:  # contiguous rows: the transpose kernel
        transpose(a.detach().numpy()[None], out.numpy()[None, :, :n], torch.get_num_threads())
    elif a.numel() <= SERIAL_COPY_MAX:
        np.copyto(out.numpy()[:, :n], a.detach().numpy().T)
    else:
        out[:, :n].copy_(a.detach().t())
    return out.data_ptr(), out


class _Structure:
    """One layer's kept connections as the kernels want them: the CSR product over W (forward), over W^T (input
    gradient, its values gathered from W's by ``perm`` at each backward) and the sampled product (weight gradient)."""

    def __init__(self, keep: np.ndarray, values: np.ndarray) -> None:
        n_out, n_in = keep.shape
        self.shape = (n_out, n_in)
        self.positions = np.flatnonzero(keep)  # row-major, int64
        rows, cols = np.divmod(self.positions, n_in)
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_out))]).astype(np.int32)
        cols_w = cols.astype(_index_dtype(n_in))
        # row-major (tile_major=False): the optimizer steps the values in place, in the layer's own order
        self.product = CSRProduct(indptr, cols_w, np.ascontiguousarray(values, dtype=np.float32), n_in,
                                  tile_major=False)
        self.sampled = SampledProduct(indptr, cols_w, n_in)
        perm = np.lexsort((rows, cols))  # W^T's nonzeros (by column of W, then row) as indices into W's
        t_indptr = np.concatenate([[0], np.cumsum(np.bincount(cols, minlength=n_in))]).astype(np.int32)
        self.product_t = CSRProduct(t_indptr, rows[perm].astype(_index_dtype(n_out)),
                                    np.zeros(perm.size, np.float32), n_out, tile_major=False)
        self.values_t = torch.from_numpy(self.product_t.vals)
        self.perm = torch.from_numpy(perm)
        self.positions_t = torch.from_numpy(self.positions)
        self._plans: dict[tuple, tuple[Any, Any, Any]] = {}
        self._linear: dict[tuple[int, int, bool], _LinearCalls] = {}
        self.values_address = self.product.vals.ctypes.data
        self._direct: dict[tuple, _DirectConv] = {}

    def direct(self, channels: int, kernel_size: tuple[int, int], padded: tuple[int, int]) -> _DirectConv:
        """The flat products of a stride-1 convolution over padded images of ``padded`` (height, width), cached
        (a model sees few input sizes)."""
        key = (channels, kernel_size, padded)
        found = self._direct.get(key)
        if found is None:
            if len(self._direct) >= 4:
                self._direct.clear()
            found = self._direct[key] = _DirectConv(self, channels, kernel_size, padded)
        return found

    def values_rebound(self) -> None:
        """The forward product reads new values memory: drop what holds the old address."""
        self.values_address = self.product.vals.ctypes.data
        self._plans.clear()
        self._linear.clear()
        self._direct.clear()

    @property
    def nnz(self) -> int:
        return int(self.positions.size)

    def plans(self, m: int, threads: int, blocks: int = 0) -> tuple[Any, Any, Any]:
        """(forward, input-gradient, weight-gradient) kernel plans, cached: a step's calls then check nothing again
        (the arrays are the layer's own, made for these shapes). ``blocks`` = 0: one (rows, m) array in rows of
        _lead(m) floats (a Linear layer), the products written into their outputs; else that many (rows, m) blocks,
        one per image (a convolution's columns), the products added to their outputs. The weight gradient's plan
        writes its sums."""
        key = (m, threads, blocks)
        found = self._plans.get(key)
        if found is None:
            if len(self._plans) >= 8:
                self._plans.clear()
            ld, widest, batches = (m, _widest(m), blocks) if blocks else (_lead(m), _widest(m), 1)
            overwrite = not blocks
            found = self._plans[key] = (self.product.matmul_plan(batches, m, threads, widest, ld, overwrite),
                                        self.product_t.matmul_plan(batches, m, threads, widest, ld, overwrite),
                                        self.sampled.plan(m, threads, ld, batches) if self.nnz else None)
        return found

    def linear(self, n: int, threads: int, bias: Tensor | None) -> _LinearCalls:
        """What a Linear layer's forward and backward run for a batch of ``n`` on ``threads`` threads, cached."""
        key = (n, threads, bias is not None)
        found = self._linear.get(key)
        if found is None or (bias is not None and found.bias_address != bias.data_ptr()):  # bias storage replaced
            if len(self._linear) >= 8:
                self._linear.clear()
            found = self._linear[key] = _LinearCalls(self, n, threads, bias)
        return found


class _LinearCalls:
    """A Linear layer's kernel plans for one batch size: m, the lead, and forward / input-gradient / weight-gradient
    plans that write their outputs (no zeroing pass before them), each one call (every Python-level operation in a
    step costs several times what it costs alone: a small layer's step is mostly such calls). With a bias, the
    forward plan's first calls write each row's sum plus the bias (``spmmb_*`` kernels), and the weight-gradient
    plan's tasks also write the output gradient's row sums, the bias gradient, after the weight gradient in one
    buffer (:meth:`grads`). The input-gradient plan's tasks gather W^T's values from the weight's first (no
    ``index_select`` between them)."""

    def __init__(self, structure: _Structure, n: int, threads: int, bias: Tensor | None) -> None:
        self.structure, self.threads = structure, threads
        self.m = m = _columns(n)
        self.ld = ld = _lead(m)
        # the live bias, which the optimizer steps in place: the forward plan reads it at each run
        self.bias_address = 0 if bias is None else bias.data_ptr()
        self.forward = structure.product.matmul_plan(1, m, threads, _widest(m), ld, overwrite=True,
                                                     bias_address=self.bias_address)
        self.transposed = structure.product_t.matmul_plan(1, m, threads, _widest(m), ld, overwrite=True, gather=(
            structure.values_address, structure.perm.data_ptr()))
        n_in = structure.shape[1]
        self.transposer = transpose_plan(1, n, n_in, (0, 4 * n_in), (0, 4 * ld), threads) \
            if n == m and n_in % 8 == 0 and n_in else None  # the input's copy (see _batch_minor)
        self._grads: dict[tuple[bool, bool], Any] = {}

    def transposed_plain(self) -> Any:
        """The input-gradient plan without its gather, over W^T's values as they are (cached by the product): for a
        weight whose storage was replaced between the forward and the backward."""
        return self.structure.product_t.matmul_plan(1, self.m, self.threads, _widest(self.m), self.ld, overwrite=True)

    def grads(self, values: bool, bias: bool) -> Any:
        """The plan writing the weight gradient (``values``: nnz floats) and then (``bias``) the bias gradient
        (n_out floats) into one buffer, ``plan.run(x_address, buffer_address, dy_address)``; None where there is
        nothing to compute (no kept weight and no bias gradient wanted)."""
        key = (values, bias)
        if key not in self._grads:
            structure = self.structure
            products = values and structure.nnz > 0
            self._grads[key] = structure.sampled.plan(
                self.m, self.threads, self.ld, products=products,
                row_sums=(structure.nnz if values else 0) if bias else None) if products or bias else None
        return self._grads[key]


class _DirectConv:
    """A stride-1 convolution's kept taps as three flat products over its zero-padded input images, without
    im2col (whose copy, K = C * kh * kw floats per output position, cost more than the sparse product saved).

    With the padded images flat (Hp x Wp each, C planes), tap (c, i, j) of output channel o reads
    ``x[c * Hp * Wp + i * Wp + j + t]`` for output position t = p * Wp + q: an output row of the product is
    ``out_h`` rows of Wp floats (the last kw - 1 of each discarded), ``m`` floats in all (rounded up to 8):
    - forward: out[b, o] += w * x[b, offset + 0:m] (:meth:`CSRProduct.flat_plan` with the taps' offsets);
    - weight gradient: dW[o, tap] = dy[b, o] . x[b, offset + 0:m] summed over images (the SDDMM with ldx = 1),
      dy laid out the same way with zeros at the discarded positions;
    - input gradient: dx[b, c, s] += w * dy[b, o, s - offset] for s over the padded plane: a product over the
      transposed pattern whose columns are offsets into the output gradient, its rows stored after ``prefix``
      zeros (the largest offset of a tap within a plane) so that no offset is negative; the zeros at the
      discarded positions make every out-of-window read count nothing.
    Multiply-adds: nnz x (Wp / out_w) of the ideal for forward and weight gradient, nnz x Hp * Wp / (out_h * out_w)
    for the input gradient (LeNet-5's conv2: 1.5x and 2.25x of 12% of the dense layer's)."""

    def __init__(self, structure: _Structure, channels: int, kernel_size: tuple[int, int],
                 padded: tuple[int, int]) -> None:
        n_out, k = structure.shape
        (kh, kw), (hp, wp) = kernel_size, padded
        self.padded, self.out_hw = padded, (hp - kh + 1, wp - kw + 1)
        self.image = channels * hp * wp
        self.m = _columns(self.out_hw[0] * wp)  # floats per output row of a channel (forward, weight gradient)
        self.m_in = _columns(hp * wp)  # floats per padded input plane (input gradient)
        self.prefix = (kh - 1) * wp + kw - 1
        self.row = self.prefix + self.m_in  # floats per output-gradient row: prefix zeros, then the m floats
        rows, taps = np.divmod(structure.positions, k)
        flat_offsets = tap_offsets(taps, kernel_size, padded)  # ascending within each row
        channel, within = np.divmod(flat_offsets, hp * wp)
        offsets = flat_offsets.astype(_index_dtype(self.image))
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_out))]).astype(np.int32)
        self.product = CSRProduct(indptr, offsets, structure.product.vals, self.image,
                                  tile_rows=max(self.image, 1), tile_major=False)
        self.product.rebind_values(structure.product.vals)  # the layer's live values, stepped in place
        self.sampled = SampledProduct(indptr, offsets, self.image)
        t_cols = rows * self.row + self.prefix - within
        perm = np.lexsort((t_cols, channel))
        t_indptr = np.concatenate([[0], np.cumsum(np.bincount(channel, minlength=channels))]).astype(np.int32)
        n_t = max(n_out * self.row, 1)
        self.product_t = CSRProduct(t_indptr, t_cols[perm].astype(_index_dtype(n_t)), np.zeros(perm.size, np.float32),
                                    n_out * self.row, tile_rows=n_t, tile_major=False)
        self.values_t = torch.from_numpy(self.product_t.vals)
        self.perm = torch.from_numpy(perm)


class _DirectConvFunction(torch.autograd.Function):
    """A stride-1 Conv2d through :class:`_DirectConv`'s three flat products."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, values: Tensor, bias: Tensor | None, layer: SparseComputeLayer) -> Tensor:
        structure, module = layer.structure, layer.module
        (ph, pw), (kh, kw) = module.padding, module.kernel_size
        batch, channels, height, width = x.shape
        hp, wp = height + 2 * ph, width + 2 * pw
        if hp < kh or wp < kw:
            raise ValueError(f"{layer.name}: input {list(x.shape)} is smaller than the kernel {[kh, kw]}")
        direct = structure.direct(channels, (kh, kw), (hp, wp))
        out_h, out_w = direct.out_hw
        flat = padded_images(x.detach().numpy(), (ph, pw), direct.m)  # the loads run up to m floats past
        n_out = structure.shape[0]
        out = np.empty((batch, n_out, direct.m), np.float32)
        out[:] = 0.0 if bias is None else bias.detach().numpy()[None, :, None]
        direct.product.flat_plan(batch, direct.m, torch.get_num_threads()).run(flat.ctypes.data, out.ctypes.data)
        ctx.save_for_backward(values)
        ctx.layer, ctx.structure, ctx.direct, ctx.flat, ctx.has_bias = layer, structure, direct, flat, \
            bias is not None
        ctx.input_shape = x.shape
        y = torch.from_numpy(out)[:, :, :out_h * wp].unflatten(2, (out_h, wp))[..., :out_w]
        return y.contiguous()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        _check_backward(ctx)
        (values,) = ctx.saved_tensors
        structure, direct, flat = ctx.structure, ctx.direct, ctx.flat
        batch, channels, height, width = ctx.input_shape
        (ph, pw), (hp, wp), (out_h, out_w) = ctx.layer.module.padding, direct.padded, direct.out_hw
        n_out, row = structure.shape[0], direct.row
        threads = torch.get_num_threads()
        dy = np.zeros((batch, n_out, row), np.float32)
        np.copyto(np.lib.stride_tricks.as_strided(dy[:, :, direct.prefix:], (batch, n_out, out_h, out_w),
                                                  (4 * n_out * row, 4 * row, 4 * wp, 4)), grad.detach().numpy())
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            torch.index_select(values.detach(), 0, direct.perm, out=direct.values_t)
            dx = np.zeros((batch, channels, direct.m_in), np.float32)
            direct.product_t.flat_plan(batch, direct.m_in, threads).run(dy.ctypes.data, dx.ctypes.data)
            planes = torch.from_numpy(dx)[:, :, :hp * wp].unflatten(2, (hp, wp))
            grad_x = planes[:, :, ph:ph + height, pw:pw + width]
        if ctx.needs_input_grad[1]:
            grad_values = torch.empty(structure.nnz)  # the sampled product writes every entry
            if structure.nnz:
                direct.sampled.plan(direct.m, threads, blocks=batch, ldx=1, ldd=row, x_step=direct.image,
                                    d_step=n_out * row, d_offset=direct.prefix).run(
                    flat.ctypes.data, grad_values.numpy().ctypes.data, dy.ctypes.data)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.detach().sum((0, 2, 3))
        return grad_x, grad_values, grad_bias, None


def _check_backward(ctx: Any) -> None:
    """What neither sparse function supports at backward time, with the way out."""
    if torch.is_grad_enabled():
        raise RuntimeError("sparse compute does not support double backward (create_graph=True): call "
                           "handle.remove() to train those layers dense")
    if ctx.structure is not ctx.layer.structure:
        raise RuntimeError("the layer was pruned again between its forward and backward; run the forward again")


class _SparseLinearFunction(torch.autograd.Function):
    """A Linear layer over its kept connections: forward y^T = W x^T, input gradient W^T dy^T and the weight
    gradient at the kept positions, with x, y and their gradients in the batch-minor layout (:func:`_batch_minor`).
    Each call allocates its outputs with torch and hands the kernels addresses only (every numpy view, ``ctypes``
    address and torch op costs microseconds, several times more inside a step than alone)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, values: Tensor, bias: Tensor | None, layer: SparseComputeLayer) -> Tensor:
        structure = layer.structure
        n = x.shape[0]
        calls = structure.linear(n, torch.get_num_threads(), bias)
        x_address, xt = _batch_minor(x, calls.m, calls.transposer)
        n_out, ld = structure.shape[0], calls.ld
        out = torch.empty(n_out, ld)
        address = out.data_ptr()
        calls.forward.run(x_address, address)  # writes the product plus the bias
        # x's own memory is saved through autograd (which then notices an in-place change of it), a copy here
        ctx.save_for_backward(values, x if xt is None else None)
        ctx.layer, ctx.structure, ctx.calls, ctx.xt, ctx.has_bias = layer, structure, calls, xt, bias is not None
        return out.as_strided((n, n_out), (1, ld))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        _check_backward(ctx)
        values, x = ctx.saved_tensors
        structure, calls = ctx.structure, ctx.calls
        dy_address, dyt = _batch_minor(grad, calls.m)  # dyt (a copy, or None) holds the memory while it is read
        grad_x = grad_values = grad_bias = None
        needs = ctx.needs_input_grad
        if needs[0]:
            n_in, ld = structure.shape[1], calls.ld
            gx = torch.empty(n_in, ld)
            if values.data_ptr() == structure.values_address:
                calls.transposed.run(dy_address, gx.data_ptr())  # gathers W^T's values from the weight's first
            else:  # the weight's storage was replaced since the forward: gather from where it is now
                torch.index_select(values.detach(), 0, structure.perm, out=structure.values_t)
                calls.transposed_plain().run(dy_address, gx.data_ptr())
            grad_x = gx.as_strided((grad.shape[0], n_in), (1, ld))
        want_bias = ctx.has_bias and needs[2]
        if needs[1] or want_bias:
            # one buffer: the weight gradient, then the bias gradient (the two parameters' .grad are views of it)
            nnz = structure.nnz if needs[1] else 0
            buffer = torch.empty(nnz + (structure.shape[0] if want_bias else 0))
            plan = calls.grads(needs[1], want_bias)
            if plan is not None:
                x_address = ctx.xt.data_ptr() if x is None else x.data_ptr()
                plan.run(x_address, buffer.data_ptr(), dy_address)
            if needs[1] and want_bias:
                grad_values, grad_bias = buffer.split_with_sizes((nnz, structure.shape[0]))
            elif needs[1]:
                grad_values = buffer
            else:
                grad_bias = buffer
        del dyt
        return grad_x, grad_values, grad_bias, None


class _SparseConvFunction(torch.autograd.Function):
    """A Conv2d as a sparse product over its im2col columns, one block per image: out[b] (O, L) = W (O, C*kh*kw) @
    cols[b] (C*kh*kw, L), L the output positions (rounded up to 8) as the fast dimension, so each image's columns
    stay in cache for all the kernel's rows (one flat (K, B*L) array ran 3.5x slower: L3-bound); the output is then
    NCHW as it stands. Weight gradient: the SDDMM of the output gradient with the saved columns, summed over the
    blocks. Input gradient: dense (oneDNN's backward-data with the masked weight; a sparse W^T dy plus col2im, one
    numpy add per kernel offset, measured slower). The columns are one strided numpy copy (``F.unfold`` took 2x
    longer)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, values: Tensor, bias: Tensor | None, layer: SparseComputeLayer) -> Tensor:
        structure, module = layer.structure, layer.module
        n_out, k = structure.shape
        (kh, kw), (dh, dw), (sh, sw), (ph, pw) = module.kernel_size, module.dilation, module.stride, module.padding
        batch, channels = x.shape[:2]
        padded = F.pad(x.detach(), (pw, pw, ph, ph)) if ph or pw else x.detach()
        height, width = padded.shape[2:]
        out_h, out_w = (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1
        if out_h <= 0 or out_w <= 0:
            raise ValueError(f"{layer.name}: input {list(x.shape)} is smaller than the kernel {[kh, kw]}")
        positions = out_h * out_w
        m = _columns(positions)
        cols = np.empty((batch, k, m), np.float32)
        if m != positions:
            cols[:, :, positions:] = 0.0
        source = padded.numpy()
        xb, xc, xh, xw = source.strides
        np.copyto(np.lib.stride_tricks.as_strided(cols, (batch, channels, kh, kw, out_h, out_w),
                                                  (4 * k * m, 4 * kh * kw * m, 4 * kw * m, 4 * m, 4 * out_w, 4)),
                  np.lib.stride_tricks.as_strided(source, (batch, channels, kh, kw, out_h, out_w),
                                                  (xb, xc, xh * dh, xw * dw, xh * sh, xw * sw), writeable=False))
        out = np.empty((batch, n_out, m), np.float32)
        out[:] = 0.0 if bias is None else bias.detach().numpy()[None, :, None]
        structure.plans(m, torch.get_num_threads(), batch)[0].run(cols.ctypes.data, out.ctypes.data)
        ctx.save_for_backward(values)
        ctx.layer, ctx.structure, ctx.cols, ctx.has_bias = layer, structure, cols, bias is not None
        ctx.input_shape, ctx.out_hw = x.shape, (out_h, out_w)
        return torch.from_numpy(out)[:, :, :positions].view(batch, n_out, out_h, out_w)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        _check_backward(ctx)
        (values,) = ctx.saved_tensors
        structure, cols, (out_h, out_w) = ctx.structure, ctx.cols, ctx.out_hw
        n_out = structure.shape[0]
        batch, _, m = cols.shape
        positions = out_h * out_w
        sampled_plan = structure.plans(m, torch.get_num_threads(), batch)[2]
        dy = np.empty((batch, n_out, m), np.float32)
        if m != positions:
            dy[:, :, positions:] = 0.0
        np.copyto(np.lib.stride_tricks.as_strided(dy, (batch, n_out, out_h, out_w),
                                                  (4 * n_out * m, 4 * m, 4 * out_w, 4)),
                  grad.detach().numpy())
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:  # dense: oneDNN's backward-data beats a sparse product + col2im here
            module = ctx.layer.module
            grad_x = torch.nn.grad.conv2d_input(ctx.input_shape, ctx.layer.dense_from(values), grad.detach(),
                                                module.stride, module.padding, module.dilation)
        if ctx.needs_input_grad[1]:
            grad_values = torch.empty(structure.nnz)  # the sampled product writes every entry
            if sampled_plan is not None:
                sampled_plan.run(cols.ctypes.data, grad_values.numpy().ctypes.data, dy.ctypes.data)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = torch.from_numpy(dy[:, :, :positions].sum((0, 2), dtype=np.float32))
        return grad_x, grad_values, grad_bias, None


_AUTOCAST_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


def _direct_apply(function: type[torch.autograd.Function]) -> Callable[..., Tensor]:
    """``function.apply`` without the Python layer of ``torch.autograd.Function.apply`` (a check for functorch
    transforms and a pytree walk over the arguments for escaped functorch wrappers: with autograd's own ctx set-up,
    5-12 us a call inside a LeNet-300-100 step; whole sparse-compute steps 2.5% faster than through it, interleaved),
    straight to autograd's C apply. Where a functorch transform is active or the input is a functorch wrapper, and
    wherever this torch has no C apply to take, the public ``apply``."""
    c_apply = getattr(getattr(torch._C, "_FunctionBase", None), "__dict__", {}).get("apply")
    wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    if c_apply is None or wrapped is None:
        return function.apply
    bound = c_apply.__get__(None, function)
    transforms_active = torch._C._are_functorch_transforms_active

    def apply(x: Tensor, *args: Any) -> Tensor:
        if transforms_active() or wrapped(x):
            return function.apply(x, *args)
        return bound(x, *args)

    return apply


class SparseComputeLayer:
    """The sparse-compute state of one ``nn.Linear``, ``Conv1D`` or ``nn.Conv2d``: its dense parameter (held by the
    pruner, refreshed on demand), its compact ``weight_values`` parameter and the kernels' structure (a convolution's
    weight as the (out_channels, in_channels * kh * kw) matrix of its im2col product, a Conv1D's transposed)."""

    def __init__(self, name: str, module: nn.Module, dense: nn.Parameter, keep: Tensor) -> None:
        self.name, self.module, self.dense, self.original_class = name, module, dense, type(module)
        self.weight_shape = tuple(dense.shape)
        self.conv = isinstance(module, nn.Conv2d)
        self.transposed = _is_conv1d(module)  # transformers' Conv1D: y = x @ W + b, W (in, out)
        self.set_structure(_Structure(self.kernel_keep(keep), np.zeros(int(keep.count_nonzero()), np.float32)))
        with torch.no_grad():
            self.structure.product.vals[:] = dense.detach().reshape(-1)[self.dense_index].numpy()
        self.values = nn.Parameter(torch.from_numpy(self.structure.product.vals), requires_grad=dense.requires_grad)

    def kernel_keep(self, keep: Tensor) -> np.ndarray:
        """The kept connections as the kernels' (outputs, inputs) matrix."""
        keep = keep.cpu().numpy()
        return np.ascontiguousarray(keep.T) if self.transposed else keep.reshape(self.weight_shape[0], -1)

    def set_structure(self, structure: _Structure) -> None:
        """Use ``structure``; ``dense_index``: where its nonzeros (the compact order) lie in the flat dense weight."""
        self.structure = structure
        if self.transposed:
            n_out, n_in = structure.shape
            rows, cols = np.divmod(structure.positions, n_in)
            self.dense_index = torch.from_numpy(cols * n_out + rows)
        else:
            self.dense_index = structure.positions_t

    def dense_from(self, values: Tensor, differentiable: bool = False) -> Tensor:
        """The dense weight, pruned entries zero: detached, or (``differentiable``) a function of ``values`` that
        autograd takes back to them (the dense gradient read at the kept positions)."""
        if differentiable:
            flat = torch.zeros(math.prod(self.weight_shape), dtype=values.dtype)
            return flat.index_put((self.dense_index,), values).view(self.weight_shape)
        out = torch.zeros(self.weight_shape, dtype=values.dtype)
        out.view(-1)[self.dense_index] = values.detach()
        return out

    def _conv(self, x: Tensor) -> Tensor:
        channels = self.weight_shape[1]
        if x.dim() not in (3, 4) or x.shape[-3] != channels:
            raise ValueError(f"{self.name} expects (N, {channels}, H, W) inputs, got shape {list(x.shape)}")
        values, bias = self.module.weight_values, self.module.bias
        self._check_values(values)
        if x.dim() == 3:
            return self._conv(x[None])[0]
        if x.shape[0] == 0:
            weight = self.dense_from(values, differentiable=values.requires_grad)  # zero gradients, not none
            return F.conv2d(x, weight, bias, self.module.stride, self.module.padding, self.module.dilation)
        if self.module.stride == (1, 1) and self.module.dilation == (1, 1):
            return _direct_conv_apply(x, values, bias, self)
        return _conv_apply(x, values, bias, self)

    def _check_values(self, values: Tensor) -> None:
        if values.dtype != torch.float32 or not values.is_cpu:
            raise TypeError(f"sparse compute ({self.name}) needs float32 CPU weights, got {values.dtype} on "
                            f"{values.device}: call handle.remove() before changing dtype or device")
        structure = self.structure
        if values.data_ptr() != structure.values_address:  # the storage was replaced (e.g. .data =)
            structure.product.rebind_values(values.detach().contiguous().numpy())
            structure.values_rebound()  # plans and direct products hold the old values' address

    def compact_from(self, dense: Tensor) -> Tensor:
        return dense.detach().reshape(-1)[self.dense_index].contiguous()

    def __call__(self, x: Tensor) -> Tensor:
        if torch.is_autocast_enabled("cpu") and x.is_cpu and x.dtype in _AUTOCAST_INPUTS:
            # mixed precision: the layer computes in float32 (its weights are float32) and returns float32, as a
            # torch.amp.custom_fwd(cast_inputs=torch.float32) op does; autocast is off inside, so no op of ours
            # (a dense fallback, the bias) is cast down
            with torch.autocast("cpu", enabled=False):
                return self(x.float())
        n_out, n_in = self.structure.shape
        if x.dtype != torch.float32 or not x.is_cpu:
            raise TypeError(f"sparse compute ({self.name}) runs on float32 CPU tensors, got {x.dtype} on {x.device}")
        if self.conv:
            return self._conv(x)
        if x.shape[-1] != n_in:
            raise ValueError(f"{self.name} expects last dim {n_in}, got shape {list(x.shape)}")
        params = self.module._parameters  # what module.weight_values / .bias read, without nn.Module.__getattr__
        values, bias = params["weight_values"], params.get("bias")
        self._check_values(values)
        if bias is not None and (bias.dtype != torch.float32 or bias.shape != (n_out,) or not bias.is_contiguous()):
            # the kernels read n_out floats at the bias's address
            raise TypeError(f"sparse compute ({self.name}) needs a contiguous float32 bias of shape [{n_out}], got "
                            f"{bias.dtype} of shape {list(bias.shape)}")
        if x.numel() == 0:  # an empty batch: dense, so that input, weight and bias still get (zero) gradients
            return F.linear(x, self.dense_from(values, differentiable=values.requires_grad), bias)
        if x.dim() == 2:
            return _linear_apply(x, values, bias, self)
        lead = x.shape[:-1]
        return _linear_apply(x.reshape(-1, n_in), values, bias, self).reshape(*lead, n_out)


_linear_apply = _direct_apply(_SparseLinearFunction)
_direct_conv_apply = _direct_apply(_DirectConvFunction)
_conv_apply = _direct_apply(_SparseConvFunction)


def _sparse_forward(self: nn.Linear, x: Tensor) -> Tensor:
    return self._magprune_sparse(x)


def _dense_weight(self: nn.Linear) -> Tensor:
    """What ``weight`` reads while sparse compute is on: a dense copy, pruned entries zero. Under grad mode it is a
    function of ``weight_values``, so code that reads the weight instead of calling the module (``F.linear(x,
    fc.weight)``, a weight tied by hand) still trains the layer, at dense cost; detached otherwise."""
    layer, values = self._magprune_sparse, self._parameters["weight_values"]
    return layer.dense_from(values, differentiable=torch.is_grad_enabled() and values.requires_grad)


_CLASSES: dict[type, type] = {}


def _sparse_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"SparseCompute{cls.__name__}", (cls,),
                             {"forward": _sparse_forward, "weight": property(_dense_weight)})
    return _CLASSES[cls]


def _state_dict_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    values = state_dict.pop(prefix + "weight_values")
    bias = state_dict.pop(prefix + "bias", None)
    state_dict[prefix + "weight"] = module._magprune_sparse.dense_from(values)
    if bias is not None:
        state_dict[prefix + "bias"] = bias


def _load_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any, strict: bool,
               missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    key = prefix + "weight"
    if key in state_dict:
        layer = module._magprune_sparse
        weight = state_dict.pop(key)
        if tuple(weight.shape) != layer.weight_shape:
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(weight.shape)}, the "
                              f"shape in current model is {layer.weight_shape}")
            return
        state_dict[prefix + "weight_values"] = layer.compact_from(weight)


class SparseCompute:
    """Handle of :func:`sparse_compute`: ``remove()`` puts the dense weights (and the optimizers' state) back."""

    def __init__(self, model: nn.Module, pruner: Pruner, layers: dict[str, SparseComputeLayer]) -> None:
        self.model, self.pruner, self.layers = model, pruner, layers
        self._hooks: list[Any] = []
        self._active = False

    @property
    def names(self) -> list[str]:
        """The weights (pruner names) computed sparse."""
        return list(self.layers)

    def compact(self, params: Iterable[Tensor]) -> list[Tensor]:
        """``params`` with each sparse layer's dense weight replaced by its compact ``weight_values`` (e.g. the
        tensors a weight penalty applies to: the pruned entries are zero, so the penalty is the same)."""
        swap = {id(layer.dense): layer.values for layer in self.layers.values()} if self._active else {}
        return [swap.get(id(p), p) for p in params]

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [attached.optimizer for attached in self.pruner.attached]

    def _install(self) -> None:
        for layer in self.layers.values():
            module = layer.module
            params = dict(module._parameters)
            module._parameters.clear()
            module._parameters["weight_values"] = layer.values
            module._parameters.update((k, v) for k, v in params.items() if k != "weight")
            module._magprune_sparse = layer
            module.__class__ = _sparse_class(layer.original_class)
            self._hooks.append(module.register_state_dict_post_hook(_state_dict_hook))
            self._hooks.append(module.register_load_state_dict_pre_hook(_load_hook))
            for optimizer in self._optimizers():
                self._swap(optimizer, layer.dense, layer.values, lambda v, _key, layer=layer: layer.compact_from(v))
        self._active = True
        self._invalidate()

    def _invalidate(self) -> None:
        for attached in self.pruner.attached:
            attached.invalidate()

    @staticmethod
    def _swap(optimizer: torch.optim.Optimizer, old: Tensor, new: Tensor, convert) -> None:
        """Put ``new`` where ``old`` is in the optimizer's groups, with its state converted."""
        found = False
        for group in optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                if p is old:
                    group["params"][i], found = new, True
        if not found:
            return
        state = optimizer.state.pop(old, None)
        if state:
            optimizer.state[new] = {k: convert(v, k) if isinstance(v, Tensor) and v.shape == old.shape else v
                                    for k, v in state.items()}

    def sync_dense(self) -> None:
        """Write the compact weights into the dense parameters the pruner holds (before it reads them)."""
        if not self._active:
            return
        with torch.no_grad():
            for layer in self.layers.values():
                layer.dense.view(-1)[layer.dense_index] = layer.values.detach()

    def rebuild(self) -> None:
        """Follow a deeper prune: keep the entries the pruner's masks still keep (weights, gradients, the attached
        optimizers' state), in the same parameter objects, with the kernels' structure built anew."""
        for name, layer in self.layers.items():
            keep = layer.kernel_keep(self.pruner.masks[name])
            new_positions = np.flatnonzero(keep)
            old_positions = layer.structure.positions
            if np.array_equal(new_positions, old_positions):
                continue
            index = np.searchsorted(old_positions, new_positions)
            if index.size and (index.max() >= old_positions.size or
                               not np.array_equal(old_positions[np.minimum(index, old_positions.size - 1)],
                                                  new_positions)):
                raise RuntimeError(f"{name}: the new mask keeps connections that were pruned (regrowth); sparse "
                                   "compute supports deeper prunes only")
            index_t = torch.from_numpy(index)
            values = layer.values
            structure = _Structure(keep, values.detach()[index_t].numpy())
            layer.set_structure(structure)
            values.data = torch.from_numpy(structure.product.vals)
            if values.grad is not None:
                values.grad = values.grad[index_t].contiguous()
            for optimizer in self._optimizers():
                state = optimizer.state.get(values)
                if state:
                    for key, v in list(state.items()):
                        if isinstance(v, Tensor) and v.shape == (old_positions.size,):
                            state[key] = v[index_t].contiguous()
        self._invalidate()

    def remove(self) -> None:
        """Back to dense layers: the weights (and gradients, and the attached optimizers' state) in the dense
        parameters; pruned entries zero, second-moment state at pruned positions at the pruner's fill value."""
        if not self._active:
            return
        self.sync_dense()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for layer in self.layers.values():
            module = layer.module
            module.__class__ = layer.original_class
            del module._magprune_sparse
            params = dict(module._parameters)
            module._parameters.clear()
            module._parameters["weight"] = layer.dense
            module._parameters.update((k, v) for k, v in params.items() if k != "weight_values")
            if layer.values.grad is not None:
                layer.dense.grad = layer.dense_from(layer.values.grad)

            def expand(v: Tensor, key: str, layer: SparseComputeLayer = layer) -> Tensor:
                out = torch.full(layer.weight_shape, SECOND_MOMENT_FILL if key in SECOND_MOMENT_KEYS else 0.0,
                                 dtype=v.dtype)
                out.view(-1)[layer.dense_index] = v
                return out

            for optimizer in self._optimizers():
                self._swap(optimizer, layer.values, layer.dense, expand)
        self._active = False
        if self in self.pruner.compute_handles:
            self.pruner.compute_handles.remove(self)
        self._invalidate()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.names}, active={self._active})"


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's layers): a Linear with its weight stored (in, out), by its class's name and
    module, so that transformers is not imported here; a subclass with its own forward is not one."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and hasattr(module, "nf") \
        and isinstance(getattr(module, "weight", None), Tensor) and module.weight.dim() == 2 \
        and module.weight.shape[1] == module.nf


def _sparse_conv_ok(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward and module.groups == 1 \
        and module.padding_mode == "zeros" and not isinstance(module.padding, str)


def sparse_compute(model: nn.Module, pruner: Pruner, layers: Iterable[str] | None = None, *,
                   max_density: float = MAX_DENSITY, conv_max_density: float = CONV_MAX_DENSITY,
                   min_weights: int | None = None) -> SparseCompute:
    """Compute only the kept connections of the pruner's pruned ``nn.Linear`` (transformers' ``Conv1D`` too, and
    sparse enough ``nn.Conv2d``) weights while retraining.

    Each such layer (of ``layers``, pruner parameter names, if given; density at most ``max_density``, for a
    convolution at most ``conv_max_density``: a denser one is faster dense, see :data:`CONV_MAX_DENSITY`; at least
    ``min_weights`` weights, default :data:`MIN_WEIGHTS`, unless named in ``layers``) gets a compact
    parameter ``weight_values`` in place of ``weight`` and runs forward, input gradient and weight gradient
    through the sparse kernels. Optimizers attached to the pruner (:meth:`Pruner.attach`) are switched to the
    compact parameters with their state; create other optimizers (and wrap the model in DDP) after this call.
    ``model.fc.weight`` reads a dense copy (under grad mode one that autograd takes back to ``weight_values``: code
    that reads the weight instead of calling the layer still trains it); ``nn.MultiheadAttention``'s ``out_proj``
    (read that way) and weights tied to another parameter name stay masked dense; ``state_dict`` writes and loads
    the plain keys and shapes; a later ``pruner.prune`` (deeper only) rebuilds the layers. Returns a handle whose
    ``remove()`` switches back.

    Not supported (clear errors): regrowing prunes, double backward, non-float32 or CUDA weights, CUDA inputs,
    non-float32 inputs outside autocast (under CPU autocast the layers compute and return float32).
    Layers above those densities, grouped or padding-mode convolutions and other layer types stay dense under the
    pruner's masks.
    """
    if not isinstance(pruner, Pruner):
        raise TypeError(f"pruner must be a magprune.Pruner, got {type(pruner).__name__}")
    if not pruner.masks:
        raise ValueError("sparse_compute needs a pruned model: call pruner.prune(...) first")
    if pruner.compute_handles:
        raise RuntimeError("sparse compute is already on for this pruner; call its handle's remove() first")
    if not 0.0 < max_density <= 1.0:
        raise ValueError(f"max_density must be in (0, 1], got {max_density}")
    if not 0.0 <= conv_max_density <= 1.0:
        raise ValueError(f"conv_max_density must be in [0, 1], got {conv_max_density}")
    modules = dict(model.named_modules())
    # nn.MultiheadAttention passes out_proj.weight to F.multi_head_attention_forward and never calls out_proj
    read_as_tensor = {id(m.out_proj) for m in modules.values() if isinstance(m, nn.MultiheadAttention)}
    shared: dict[int, list[str]] = {}  # a parameter's names in the model: more than one if tied
    for key, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(key)
    wanted = set(layers) if layers is not None else None
    if wanted is not None and (unknown := sorted(wanted - set(pruner.masks))):
        raise ValueError(f"layers {unknown} are not pruned weights of this pruner; pruned: {sorted(pruner.masks)}")
    chosen: dict[str, SparseComputeLayer] = {}
    left_dense: list[str] = []  # why a layer that could otherwise compute sparse stays dense
    for name, param in pruner.params.items():
        if name not in pruner.masks or (wanted is not None and name not in wanted) or not name.endswith("weight"):
            continue
        module = modules.get(module_name(name) if "." in name else "")
        linear = (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward) or _is_conv1d(module)
        if not (linear or _sparse_conv_ok(module)) or module.weight is not param:
            if wanted is not None:
                raise ValueError(f"{name}: sparse compute supports nn.Linear, transformers' Conv1D and nn.Conv2d "
                                 "weights (groups 1, zero padding given as numbers) only")
            continue
        if len(tied := shared.get(id(param), [])) > 1:
            why = (f"{name} is tied ({', '.join(tied)}): computing it sparse would untie it (the other users keep "
                   "the dense parameter); it retrains masked dense")
        elif id(module) in read_as_tensor:
            why = (f"{name}: nn.MultiheadAttention reads its out_proj weight as a tensor and never calls the layer, "
                   "so it cannot compute sparse; it retrains masked dense")
        else:
            why = None
        if why is not None:
            if wanted is not None:
                raise ValueError(why)
            left_dense.append(why)
            continue
        if sharding.is_sharded(param):
            raise ValueError(f"{name}: sparse compute does not support FSDP-sharded (DTensor) weights; wrap the "
                             "model in DDP after sparse_compute (the compact gradients are all-reduced) or retrain "
                             "masked")
        if param.device.type != "cpu":
            raise ValueError(f"{name}: sparse compute runs on CPU, the weight is on {param.device}")
        if param.dtype != torch.float32:
            raise TypeError(f"{name}: sparse compute supports float32 weights, got {param.dtype}")
        mask = pruner.masks[name]
        if int(mask.count_nonzero()) > (max_density if linear else conv_max_density) * mask.numel():
            continue
        if wanted is None and mask.numel() < (MIN_WEIGHTS if min_weights is None else min_weights):
            continue
        chosen[name] = SparseComputeLayer(name, module, param, mask)
    if not chosen:
        raise ValueError(f"no pruned nn.Linear weight at density <= {max_density} (nn.Conv2d: <= {conv_max_density}) "
                         f"among {sorted(pruner.masks)}" + "".join(f"; {why}" for why in left_dense))
    handle = SparseCompute(model, pruner, chosen)
    handle._install()
    pruner.compute_handles.append(handle)
    return handle
