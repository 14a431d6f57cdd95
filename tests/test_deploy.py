import copy
import importlib

import numpy as np
import pytest
import torch
from torch import nn

import magprune
from magprune.deploy import (
    CompressedFormatError,
    SparseConv2d,
    SparseLinear,
    load_compressed,
    load_compressed_into,
    save_compressed,
    size_report,
    size_report_from_params,
    sparsify,
)
from magprune.deploy.format import encode_csr, encode_rel4, smallest_uint


def _han(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = magprune.create_model(name)
    magprune.Pruner(model).prune(magprune.han2015(name))
    return model.eval()


def test_smallest_uint():
    assert smallest_uint(255) == np.uint8 and smallest_uint(256) == np.uint16
    assert smallest_uint(70000) == np.uint32


def test_encodings_use_narrow_indices_and_rel4_handles_long_gaps():
    a = np.zeros((3, 300), dtype=np.float32)
    a[0, 0], a[0, 299], a[2, 150] = 1.5, -2.0, 3.0  # gaps longer than 15, a gap of 0, an empty row
    csr = encode_csr(a)
    assert csr["cols"].dtype == np.uint16 and csr["indptr"].dtype == np.uint8
    assert csr["indptr"].tolist() == [0, 2, 2, 3]
    rel = encode_rel4(a)
    assert rel["values"].tolist() == [1.5, -2.0, 3.0]
    assert rel["codes"].dtype == np.uint8


@pytest.mark.parametrize("name", ["lenet-300-100", "lenet-5"])
def test_round_trip_is_exact(tmp_path, name):
    model = _han(name)
    path = tmp_path / "m.safetensors"
    save_compressed(model, path)
    fresh = load_compressed_into(magprune.create_model(name), path)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_lenet_300_100_at_han_densities_is_ten_times_smaller(tmp_path):
    model = _han("lenet-300-100")
    path = tmp_path / "m.safetensors"
    params = save_compressed(model, path)
    dense = sum(4 * t.numel() for t in model.state_dict().values())
    assert dense / path.stat().st_size >= 10
    rows = size_report(model)
    assert {r.name for r in rows} == set(model.state_dict())
    assert sum(r.compressed_bytes for r in rows) < path.stat().st_size
    assert size_report_from_params(params) == rows  # what export prints, without encoding everything twice


def test_corrupt_truncated_and_mismatched_files_are_refused(tmp_path):
    model = _han("lenet-300-100")
    path = tmp_path / "m.safetensors"
    save_compressed(model, path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(CompressedFormatError, match="truncated.safetensors"):
        load_compressed(truncated)
    flipped = bytearray(data)
    flipped[-50] ^= 0xFF
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(CompressedFormatError, match="corrupt.safetensors.*checksum"):
        load_compressed(corrupt)
    with pytest.raises(CompressedFormatError, match="fc1.weight.*shape"):
        load_compressed_into(magprune.create_model("lenet-300-100", in_features=100), path)
    with pytest.raises(CompressedFormatError, match="no such file"):
        load_compressed(tmp_path / "missing.safetensors")


def test_sparse_modules_match_dense_under_inference_mode():
    torch.manual_seed(3)
    linear = nn.Linear(300, 40)
    conv = nn.Conv2d(3, 6, 3, padding=1, stride=2)
    with torch.no_grad():
        linear.weight.mul_(torch.rand_like(linear.weight) < 0.1)
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.2)
    for batch in (1, 5, 70):  # 70 crosses the kernel's batch block
        x = torch.randn(batch, 300)
        with torch.inference_mode():
            torch.testing.assert_close(SparseLinear(linear)(x), linear(x), rtol=1e-4, atol=1e-5)
    x = torch.randn(2, 3, 9, 9)
    with torch.inference_mode():
        torch.testing.assert_close(SparseConv2d(conv)(x), conv(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(SparseLinear(linear).to_dense().weight, linear.weight)
    with pytest.raises(RuntimeError, match="inference"):
        SparseLinear(linear)(torch.randn(1, 300, requires_grad=True))


def test_sparsify_converts_only_measured_wins_and_matches_outputs():
    model = _han("lenet-5")
    x = torch.randn(4, 1, 28, 28)
    forced = sparsify(model, batch_size=4, example_input=x, min_speedup=0.0, repeats=1)
    kept = sparsify(model, batch_size=4, max_density=0.01)
    assert isinstance(forced.fc1, SparseLinear) and isinstance(forced.conv2, SparseConv2d)
    assert isinstance(forced.conv1, nn.Conv2d)  # 66% dense: not a candidate
    assert not any(isinstance(m, SparseLinear) for m in kept.modules())
    never = sparsify(model, batch_size=4, min_speedup=1e9, repeats=1)
    timed = [d for d in never.sparsify_decisions if d.dense_ms == d.dense_ms]
    assert [d.name for d in timed] == ["fc1", "fc2"]
    needs = "a Conv2d needs example_input (its input size)"
    assert {d.name: d.reason for d in never.sparsify_decisions if d not in timed} == {"conv1": needs, "conv2": needs}
    assert not any(d.converted for d in never.sparsify_decisions)
    assert all(d.dense_ms > 0 and d.sparse_ms > 0 and "min_speedup" in d.reason for d in timed)
    with torch.inference_mode():
        torch.testing.assert_close(forced(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("simd_ms", "torch_ms", "converted", "backend"), [
    (0.80, 0.90, True, "simd"),    # 1.25x >= 1.2: converted, the faster backend kept
    (0.90, 0.80, True, "torch"),
    (0.85, 0.86, False, "simd"),   # 1.18x: below min_speedup, left dense
    (1.20, 1.50, False, "simd"),   # slower than dense: never converted
])
def test_sparsify_decides_by_min_speedup_and_keeps_the_faster_backend(monkeypatch, simd_ms, torch_ms, converted,
                                                                      backend):
    """The decision itself, with the timer replaced: dense 1.0 ms against the two sparse backends' times."""
    sparsify_module = importlib.import_module("magprune.deploy.sparsify")  # the module, not the function

    def fake_best_ms(fn, repeats):
        module = fn.__defaults__[0]  # the timed callables bind their module as the first default
        if isinstance(module, SparseLinear):
            return simd_ms if module.backend == "simd" else torch_ms
        return 1.0

    monkeypatch.setattr(sparsify_module, "best_ms", fake_best_ms)
    model = nn.Sequential(nn.Linear(64, 32))
    magprune.Pruner(model).prune(magprune.LayerSparsity(0.9))
    out = sparsify(model, batch_size=1, min_speedup=1.2)
    (decision,) = out.sparsify_decisions
    assert decision.converted is converted
    assert decision.sparse_ms == min(simd_ms, torch_ms) and decision.dense_ms == 1.0
    assert decision.backend == backend
    assert isinstance(out[0], SparseLinear) is converted
    if converted:
        assert out[0].backend == backend


@pytest.mark.parametrize("min_work", [0, 1 << 62])  # parallel and serial kernels
def test_linear_kernels_parallel_and_serial_with_padded_batches(monkeypatch, min_work):
    from magprune.kernels import csr

    monkeypatch.setattr(csr, "PARALLEL_MIN_WORK", min_work)
    monkeypatch.setattr(csr, "PARALLEL_MIN_NONZEROS", min_work)
    torch.manual_seed(4)
    linear = nn.Linear(257, 33)
    with torch.no_grad():
        linear.weight.mul_(torch.rand_like(linear.weight) < 0.3)
        linear.weight[5] = 0  # an empty row
    sparse = SparseLinear(linear)
    for batch in (1, 2, 3, 8, 9, 17, 32, 33, 130):  # widths 8/16/32 and padded blocks
        x = torch.randn(batch, 257)
        with torch.inference_mode():
            torch.testing.assert_close(sparse(x), linear(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_in, index_dtype", [(200, np.uint8), (3000, np.uint16), (70000, np.uint32)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tile_major", [False, True])  # row-major tiles (AVX2 hosts, training) and tile-major
def test_simd_kernel_matches_numpy_for_every_width_index_type_and_tiling(n_in, index_dtype, threads, tile_major,
                                                                        monkeypatch):
    from magprune.deploy.modules import _csr_arrays
    from magprune.kernels import csr
    from magprune.kernels.csr import CSRProduct

    monkeypatch.setattr(csr, "PARALLEL_MIN_WORK", 0)  # small products too: the row split is what is tested
    monkeypatch.setattr(csr, "PARALLEL_MIN_NONZEROS", 0)
    monkeypatch.setattr(csr, "major_tile_rows", lambda width: 48 if width >= 64 else 96)  # many tiles, ragged last

    rng = np.random.default_rng(n_in)
    weight = rng.standard_normal((37, n_in)).astype(np.float32) * (rng.random((37, n_in)) < 0.05)
    weight[3] = 0  # an empty row
    weight[4, :] = rng.standard_normal(n_in)  # a full one
    indptr, cols, vals = _csr_arrays(torch.from_numpy(weight))
    assert cols.dtype == index_dtype
    for tile_rows in (n_in, 64):  # one tile, and many (row pointers split per tile)
        product = CSRProduct(indptr, cols, vals, n_in, tile_rows, tile_major=tile_major)
        assert product.tiles.shape == (-(-n_in // tile_rows) + 1, 37)
        for m in (8, 16, 24, 32, 64, 72):  # every kernel width, and chunks of mixed widths
            x = rng.standard_normal((2, n_in, m)).astype(np.float32)
            out = np.full((2, 37, m), 0.5, dtype=np.float32)
            product.matmul(x, out, threads, widest=64)
            exact = weight.astype(np.float64) @ x + 0.5
            scale = np.abs(weight).astype(np.float64) @ np.abs(x) + 1.0  # float32 rounding grows with the row
            assert (np.abs(out - exact) <= 1e-5 * scale).all()
        assert bool(product._major) == tile_major  # the tile-major copy was built and used, or not
        vector = x[0, :, 0].copy()
        out = np.full(37, 0.5, dtype=np.float32)
        product.matvec(vector, out, threads)
        exact = weight.astype(np.float64) @ vector + 0.5
        assert (np.abs(out - exact) <= 1e-5 * (np.abs(weight).astype(np.float64) @ np.abs(vector) + 1.0)).all()
    copied = copy.deepcopy(product)  # cached addresses are rebuilt for the copy's own arrays
    del product
    out = np.zeros((1, 37, 8), dtype=np.float32)
    copied.matmul(np.ones((1, n_in, 8), dtype=np.float32), out, threads)
    np.testing.assert_allclose(out[0, :, 0], weight.astype(np.float64).sum(axis=1), rtol=1e-4, atol=1e-2)


def test_values_written_in_place_reach_the_batched_products(monkeypatch):
    """A SparseLinear's batched calls read a tile-major copy of its values (AVX-512 hosts): writing ``vals`` in
    place must not leave that copy stale (before the version check, the batch-2 output kept the old values)."""
    from magprune.kernels import csr

    monkeypatch.setattr(csr, "major_tile_rows", lambda width: 32)
    torch.manual_seed(5)
    linear = nn.Linear(100, 20)
    with torch.no_grad():
        linear.weight.mul_(torch.rand_like(linear.weight) < 0.3)
    sparse = SparseLinear(linear)
    sparse.product.tile_major = True  # on any host
    x = torch.randn(16, 100)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), linear(x), rtol=1e-4, atol=1e-5)
        assert sparse.product._major  # the copy exists
        sparse.vals.mul_(2.0)
        linear.weight.mul_(2.0)
        torch.testing.assert_close(sparse(x), linear(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sparse(x[:1]), linear(x[:1]), rtol=1e-4, atol=1e-5)


def test_simd_kernel_rejects_layouts_it_cannot_read():
    from magprune.kernels.csr import CSRProduct

    indptr, cols, vals = np.zeros(4, np.int32), np.zeros(0, np.uint16), np.zeros(0, np.float32)
    product = CSRProduct(indptr, cols, vals, 4)
    with pytest.raises(ValueError, match="multiple of 8"):
        product.matmul(np.zeros((1, 4, 12), np.float32), np.zeros((1, 3, 12), np.float32), 1)
    with pytest.raises(ValueError, match="float32"):
        product.matvec(np.zeros(4, np.float64), np.zeros(3, np.float32), 1)
    with pytest.raises(ValueError, match="int32 row pointers"):
        CSRProduct(indptr.astype(np.int64), cols, vals, 4)


def test_sparse_conv_with_output_positions_not_a_multiple_of_8():
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)  # 13x13 input -> 7x7 = 49 positions
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.4)
    x = torch.randn(3, 3, 13, 13)
    with torch.inference_mode():
        torch.testing.assert_close(SparseConv2d(conv)(x), conv(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("min_work", [0, 1 << 62])  # parallel and serial
@pytest.mark.parametrize("padding, size", [(0, 13), (2, 9), (1, 24)])  # output widths 11, 9, 24
def test_direct_sparse_conv_matches_dense_conv(monkeypatch, min_work, padding, size):
    from magprune.kernels import csr

    monkeypatch.setattr(csr, "PARALLEL_MIN_WORK", min_work)
    monkeypatch.setattr(csr, "PARALLEL_MIN_NONZEROS", min_work)
    torch.manual_seed(6)
    conv = nn.Conv2d(4, 7, (3, 5), padding=padding)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.3)
        conv.weight[2] = 0  # an output channel with no inputs: bias only
    sparse = SparseConv2d(conv)
    for batch in (1, 3, 9):  # with 2 threads, 9 images are split by image, fewer by output channel
        x = torch.randn(batch, 4, size, size + 3)
        with torch.inference_mode():
            torch.testing.assert_close(sparse(x), conv(x), rtol=1e-4, atol=1e-5)
    assert len(sparse._direct) == 1  # one product per input size, reused


def test_direct_conv_refuses_a_buffer_it_would_overrun():
    from magprune.kernels.csr import CSRProduct

    product = CSRProduct(np.array([0, 1], np.int32), np.array([40], np.uint16), np.ones(1, np.float32), 48)
    out = np.zeros((1, 1, 2, 8), np.float32)
    with pytest.raises(ValueError, match="read past"):
        product.conv_rows(np.zeros(48 + 7, np.float32), out, 2, 8, 1)  # row 1 reads floats 48..55
    product.conv_rows(np.ones(48 + 8, np.float32), out, 2, 8, 1)
    assert (out == 1).all()


def _with_dead_inputs() -> nn.Module:
    """LeNet-300-100 at Han's densities whose fc1 ignores the image border, as a trained one does (MNIST's border
    pixels are always 0, so their weights decay and are pruned): long runs of zeros in the index stream."""
    model = _han("lenet-300-100")
    with torch.no_grad():
        border = torch.ones(28, 28, dtype=torch.bool)
        border[4:24, 4:24] = False
        model.fc1.weight[:, border.reshape(-1)] = 0
    return model


def test_index_streams_are_stored_deflated_and_still_exact(tmp_path, monkeypatch):
    from magprune.deploy import format as sparse

    model = _with_dead_inputs()
    path, plain = tmp_path / "z.safetensors", tmp_path / "plain.safetensors"
    params = save_compressed(model, path)
    assert "codes" in params["fc1.weight"]["deflated"]
    assert any(r.encoding.endswith("+z") for r in size_report(model))
    fresh = load_compressed_into(magprune.create_model("lenet-300-100"), path)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    monkeypatch.setattr(sparse, "DEFLATE_MIN_SAVING", 2.0)  # never deflate: what version 1 wrote
    monkeypatch.setattr(sparse, "FORMAT_VERSION", 1)
    assert "deflated" not in save_compressed(model, plain)["fc1.weight"]
    assert path.stat().st_size < 0.95 * plain.stat().st_size
    load_compressed_into(magprune.create_model("lenet-300-100"), plain)  # version 1 files still load


def test_a_deflated_part_that_does_not_inflate_is_refused(tmp_path):
    import json
    import zlib

    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    path = tmp_path / "z.safetensors"
    save_compressed(_with_dead_inputs(), path)
    arrays = load_file(str(path))
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata()
    params = json.loads(zlib.decompress(arrays.pop("__params__").tobytes()))  # version 3 keeps them deflated
    good = arrays["fc1.weight/codes"]
    for bad, match in ((np.frombuffer(b"not a zlib stream", np.uint8), "corrupt"),
                       (np.frombuffer(zlib.compress(good.tobytes()[:-5]), np.uint8), "inflates to")):
        # a consistent checksum, so only the inflation can catch it
        arrays["fc1.weight/codes"] = bad
        params["fc1.weight"]["crc32"]["codes"] = zlib.crc32(bad.tobytes())
        save_file(arrays, str(tmp_path / "bad.safetensors"), metadata={**metadata, "params": json.dumps(params)})
        with pytest.raises(CompressedFormatError, match=f"fc1.weight/codes.*{match}"):
            load_compressed(tmp_path / "bad.safetensors")


def test_torch_backend_matches_dense_and_survives_copying():
    torch.manual_seed(8)
    linear = nn.Linear(120, 30)
    with torch.no_grad():
        linear.weight.mul_(torch.rand_like(linear.weight) < 0.2)
    sparse = SparseLinear(linear, backend="torch")
    for batch in (1, 7, 64):
        x = torch.randn(batch, 120)
        with torch.inference_mode():
            torch.testing.assert_close(sparse(x), linear(x), rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(sparse(x), linear(x), rtol=1e-4, atol=1e-5)
    copied = copy.deepcopy(sparse)  # after first use: holds a sparse CSR tensor, which deepcopy cannot copy
    x = torch.randn(3, 2, 120)
    with torch.inference_mode():
        torch.testing.assert_close(copied(x), linear(x), rtol=1e-4, atol=1e-5)
    assert "backend='torch'" in repr(copied)
    with pytest.raises(ValueError, match="backend must be one of"):
        SparseLinear(linear, backend="mkl")


def test_sparsify_records_the_backend_it_chose():
    model = _han("lenet-300-100")
    forced = sparsify(model, batch_size=32, min_speedup=0.0, repeats=1)
    for decision in forced.sparsify_decisions:
        assert decision.converted and decision.backend in ("simd", "torch")
        assert forced.get_submodule(decision.name).backend == decision.backend


@pytest.mark.parametrize("min_work", [0, 1 << 62])  # parallel and serial
def test_one_example_in_every_layout_matches_dense(monkeypatch, min_work):
    """Batch 1 reads x in place when it is contiguous; 1-D, extra leading dims and strided views take other paths."""
    from magprune.kernels import csr

    monkeypatch.setattr(csr, "PARALLEL_MIN_NONZEROS", min_work)
    torch.manual_seed(7)
    linear = nn.Linear(64, 24)
    with torch.no_grad():
        linear.weight.mul_(torch.rand_like(linear.weight) < 0.3)
    sparse = SparseLinear(linear)
    wide = torch.randn(1, 128)
    for x in (torch.randn(64), torch.randn(1, 64), torch.randn(1, 1, 64), wide[:, ::2], torch.randn(2, 1, 64)[1],
              torch.randn(0, 64), torch.randn(2, 0, 64)):  # empty batches too, as nn.Linear takes them
        with torch.inference_mode():
            y = sparse(x)
            assert y.shape == linear(x).shape
            torch.testing.assert_close(y, linear(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("has_bias", [True, False])
def test_one_example_path_follows_the_bias_and_returns_fresh_outputs(has_bias):
    """After its first batch-1 call a SparseLinear writes bias + W x straight into torch.empty: the bias written in
    place, replaced, or its .data swapped is read anew; each call gets its own output; copies keep working after
    the original is gone; the default dtype does not leak into the float32 output."""
    import copy
    import gc

    torch.manual_seed(3)
    linear = nn.Linear(96, 40, bias=has_bias)
    with torch.no_grad():
        linear.weight.mul_(torch.rand_like(linear.weight) < 0.3)
    sparse = SparseLinear(linear)
    x = torch.randn(1, 96)

    def expected(module: SparseLinear) -> torch.Tensor:
        return x @ linear.weight.detach().T + (module.bias if has_bias else torch.zeros(40))

    with torch.no_grad():
        first, second = sparse(x), sparse(x)  # the second takes the one-example path
        assert sparse._one is not None
        torch.testing.assert_close(second, expected(sparse), rtol=1e-5, atol=1e-5)
        assert first.data_ptr() != second.data_ptr() and second.dtype == torch.float32
        torch.testing.assert_close(sparse(x[0]), expected(sparse)[0], rtol=1e-5, atol=1e-5)
        if has_bias:
            sparse.bias.add_(1.0)  # in place: same memory
            torch.testing.assert_close(sparse(x), expected(sparse), rtol=1e-5, atol=1e-5)
            sparse.bias = torch.randn(40)  # replaced
            torch.testing.assert_close(sparse(x), expected(sparse), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(sparse(x), expected(sparse), rtol=1e-5, atol=1e-5)
            sparse.bias.data = torch.randn(40)  # its storage swapped under the same tensor
            torch.testing.assert_close(sparse(x), expected(sparse), rtol=1e-5, atol=1e-5)
            sparse.bias = torch.randn(40, dtype=torch.float64)  # not what the kernel reads: refused as before
            with pytest.raises(ValueError, match="float32"):
                sparse(x)
            sparse.bias = torch.randn(40)
        clone = copy.deepcopy(sparse)
        assert clone._one is None  # it held the original's addresses
        want = expected(sparse)
        del sparse
        gc.collect()
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            for _ in range(2):
                y = clone(x)
                assert y.dtype == torch.float32
                torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        finally:
            torch.set_default_dtype(default)
    with pytest.raises(RuntimeError, match="inference"):
        clone(x.requires_grad_())


# ---------------------------------------------------------------- models nobody here wrote
class _HFConv1D(nn.Module):
    """Shaped like transformers.pytorch_utils.Conv1D (weight stored (in, out)), under the same qualified name."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


_HFConv1D.__module__ = "transformers.pytorch_utils"


class _ReadsWeight(nn.Module):
    """A parent that reads its children's weights, as ViT's embeddings, MultiheadAttention and Conv1D users do."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 16, 4, stride=4)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.mlp = _HFConv1D(64, 16)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = self.proj(x.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)  # (B, tokens, 16)
        x = self.attn(x, x, x, need_weights=False)[0]
        return self.head(torch.relu(self.mlp(x)))


def _pruned(model: nn.Module, sparsity: float = 0.9) -> nn.Module:
    torch.manual_seed(0)
    magprune.Pruner(model).prune(magprune.LayerSparsity(sparsity))
    return model.eval()


def test_sparsify_keeps_the_module_contract_and_leaves_weight_readers_alone():
    torch.manual_seed(0)
    model = _pruned(_ReadsWeight())
    x = torch.randn(3, 3, 16, 16)
    fast = sparsify(model, example_input=x, min_speedup=0.0, repeats=1)
    decisions = {d.name: d for d in fast.sparsify_decisions}
    assert isinstance(fast.proj, SparseConv2d) and isinstance(fast.mlp, SparseLinear)
    assert isinstance(fast.head, SparseLinear)
    assert not decisions["attn.out_proj"].converted and "never called" in decisions["attn.out_proj"].reason
    torch.testing.assert_close(fast.proj.weight, model.proj.weight)  # reads as the dense tensor
    torch.testing.assert_close(fast.mlp.weight, model.mlp.weight)  # in Conv1D's (in, out) layout
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
    assert "converted" in magprune.deploy.format_decisions(fast.sparsify_decisions)


def test_sparsify_refuses_a_conversion_that_breaks_the_model():
    class Fused(nn.Module):  # reads a child's weight in a way a sparse module cannot serve
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(32, 32)

        def forward(self, x):
            return self.fc(x) * (2.0 if self.fc.weight.requires_grad else 1.0)

    model = _pruned(Fused())
    fast = sparsify(model, example_input=torch.randn(2, 32), min_speedup=0.0, repeats=1)
    assert isinstance(fast.fc, nn.Linear) and not fast.sparsify_decisions[0].converted
    assert fast.sparsify_decisions[0].reason == "the model's output differs with it sparse"


def test_sparsify_times_a_linear_at_the_real_input_shape_with_tokens():
    model = _pruned(nn.Sequential(nn.Linear(64, 64)))
    x = torch.randn(2, 50, 64)
    fast = sparsify(model, example_input=x, min_speedup=0.0, repeats=1)
    assert "at input [2, 50, 64]" in fast.sparsify_decisions[0].reason
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)


def test_sparse_conv_checks_channels_and_takes_unbatched_input():
    conv = _pruned(nn.Conv2d(3, 4, 3))
    sparse = SparseConv2d(conv)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="expects input with 3 channels"):
            sparse(torch.randn(2, 1, 8, 8))
        with pytest.raises(ValueError, match="3-D .* or 4-D"):
            sparse(torch.randn(8, 8))
        x = torch.randn(3, 8, 8)
        torch.testing.assert_close(sparse(x), conv(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: nn.Linear(40, 30), lambda: nn.Conv2d(3, 5, 3, stride=2),
                                  lambda: nn.Conv2d(3, 5, 3)])
def test_sparse_modules_hold_buffers_that_move_and_load(make):
    dense = _pruned(make())
    sparse = SparseLinear(dense) if isinstance(dense, nn.Linear) else SparseConv2d(dense)
    state = sparse.state_dict()
    assert {"indptr", "cols", "vals", "bias"} <= set(state)
    assert state["vals"].numel() == int(dense.weight.count_nonzero())
    x = torch.randn(2, 40) if isinstance(dense, nn.Linear) else torch.randn(2, 3, 9, 9)
    with torch.inference_mode():
        expected = dense(x)
        as64 = copy.deepcopy(sparse).to(torch.float64)
        assert as64.vals.dtype == torch.float64
        torch.testing.assert_close(as64(x.double()), expected.double(), rtol=1e-4, atol=1e-5)
        again = copy.deepcopy(sparse)
        again.vals.zero_()
        again.load_state_dict(state)
        torch.testing.assert_close(again(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compressed_round_trip_and_size_report_in_half_precision(tmp_path, dtype):
    model = _pruned(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))).to(dtype)
    save_compressed(model, tmp_path / "m.safetensors")
    loaded = load_compressed(tmp_path / "m.safetensors")
    for name, tensor in model.state_dict().items():
        assert loaded[name].dtype == dtype and torch.equal(loaded[name], tensor), name
    rows = {r.name: r for r in size_report(model)}
    assert rows["0.weight"].dense_bytes == 64 * 64 * 2


def test_a_model_with_batchnorm_loads_back_from_its_compressed_file(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model(torch.randn(2, 3, 8, 8))  # num_batches_tracked = 1, a 0-d tensor
    save_compressed(model, tmp_path / "bn.safetensors")
    fresh = load_compressed_into(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), tmp_path / "bn.safetensors")
    assert fresh[1].num_batches_tracked.shape == () and int(fresh[1].num_batches_tracked) == 1


def test_a_batched_plan_keeps_the_arrays_it_reads_alive():
    """A plan that another thread still runs must not read freed memory when values_changed() drops the
    tile-major copy (or rebind_values the row-major values): the plan holds what its records point into."""
    import gc
    import weakref

    from magprune.kernels.csr import CSRProduct

    rng = np.random.default_rng(3)
    weight = (rng.standard_normal((40, 300)) * (rng.random((40, 300)) < 0.2)).astype(np.float32)
    indptr = np.concatenate([[0], np.cumsum((weight != 0).sum(axis=1))]).astype(np.int32)
    product = CSRProduct(indptr, np.nonzero(weight)[1].astype(np.uint16), weight[weight != 0], 300,
                         tile_major=True)
    plan = product.matmul_plan(1, 32, 1)
    (copy,) = product._major.values()
    alive = weakref.ref(copy[2])  # the copy's values
    del copy
    product.values_changed()  # drops the copy the plan's records point into
    gc.collect()
    assert alive() is not None  # still held by the plan
    x = rng.standard_normal((1, 300, 32)).astype(np.float32)
    out = np.zeros((1, 40, 32), np.float32)
    plan.run(x.ctypes.data, out.ctypes.data)
    np.testing.assert_allclose(out[0], weight @ x[0], rtol=1e-4, atol=1e-4)
    del plan
    gc.collect()
    assert alive() is None  # and freed with it
