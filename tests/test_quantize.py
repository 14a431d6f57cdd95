"""Deep Compression: k-means weight sharing, centroid fine-tuning, the shared encoding of format v3, the kernel."""

from __future__ import annotations

import copy
import json
import re
import zlib

import numpy as np
import pytest
import torch
from torch import nn

import magprune
from magprune.criteria import LayerSparsity
from magprune.deploy import entropy
from magprune.deploy.entropy import (
    CHUNK,
    EncodingError,
    decode_stream,
    encode_stream,
    huffman_decode,
    huffman_encode,
    huffman_lengths,
    positions_from_gaps,
    relative_gaps,
)
from magprune.deploy.format import (
    CompressedFormatError,
    format_shared_table,
    load_compressed,
    save_compressed,
    shared_rows,
)
from magprune.deploy.quantize import WeightSharing, initial_centroids, kmeans_1d
from magprune.deploy.quantized import QuantizedLinear, load_quantized
from magprune.kernels import quantized as qkernel
from magprune.kernels.quantized import QuantizedProduct
from magprune.pruner import Pruner


def _pruned_mlp(seed: int = 0, sparsity: float = 0.6) -> tuple[nn.Module, Pruner]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    pruner = Pruner(model)
    pruner.prune(LayerSparsity(sparsity))
    return model, pruner


# ----------------------------------------------------------------------------------------------- k-means
def test_kmeans_hand_case():
    values = np.array([0.1, 0.2, 0.9, 1.0])
    start = initial_centroids(values, 2, "linear")
    np.testing.assert_allclose(start, [0.1, 1.0])
    centroids, labels = kmeans_1d(values, start)
    np.testing.assert_allclose(centroids, [0.15, 0.95])
    assert labels.tolist() == [0, 0, 1, 1]
    # three clusters from [-1, 0, 1]: -0.9 and -0.6 join -1's cluster, 0.5 sits exactly between 0 and 1 and goes
    # to the lower one; the means are then -0.75, 0.25 (0.0 and 0.5) and 1.0
    values = np.array([-0.9, -0.6, 0.0, 0.5, 1.0, -1.0])
    centroids, labels = kmeans_1d(values, initial_centroids(values, 3, "linear"))
    np.testing.assert_allclose(centroids, [-2.5 / 3, 0.25, 1.0])
    assert labels.tolist() == [0, 0, 1, 1, 2, 0]


def test_initialisations():
    values = np.arange(101, dtype=np.float64)
    np.testing.assert_allclose(initial_centroids(values, 5, "linear"), [0, 25, 50, 75, 100])
    skewed = np.concatenate([np.zeros(90), np.linspace(1, 10, 10)])
    assert (initial_centroids(skewed, 4, "density") < 1).sum() >= 2  # the CDF spends centroids where weights are
    a, b = initial_centroids(values, 8, "random", seed=3), initial_centroids(values, 8, "random", seed=3)
    np.testing.assert_array_equal(a, b)
    assert set(a) <= set(values)
    with pytest.raises(ValueError, match="init must be one of"):
        initial_centroids(values, 4, "kmeans++")


def test_sharing_leaves_2_to_the_bits_values_and_zeros_in_place():
    model, pruner = _pruned_mlp()
    before = {n: p.detach().clone() for n, p in pruner.params.items()}
    sharing = WeightSharing(model, pruner, bits=2)
    sharing.check()
    for name, param in pruner.params.items():
        assert torch.equal(param == 0, ~pruner.masks[name])
        assert torch.unique(param[pruner.masks[name]]).numel() <= 4
        assert sharing.labels[name].dtype == torch.uint8 and sharing.labels[name].numel() == pruner.masks[name].sum()
        # each weight went to its nearest centroid
        kept = before[name][pruner.masks[name]]
        nearest = (kept[:, None] - sharing.codebooks[name][None]).abs().argmin(1)
        assert torch.equal(nearest.to(torch.uint8), sharing.labels[name])
    assert isinstance(model.state_dict()["0.weight"], torch.Tensor)  # a plain model
    fresh = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    fresh.load_state_dict(model.state_dict(), strict=True)


def test_bits_by_layer_kind_and_name():
    model = magprune.create_model("lenet-5")
    sharing = WeightSharing(model, bits={"conv": 8, "fc": 5, "fc2": 3})
    kinds = {n: b for n, b in sharing.bits.items()}
    assert kinds["conv1.weight"] == 8 and kinds["fc1.weight"] == 5 and kinds["fc2.weight"] == 3
    with pytest.raises(ValueError, match="no entry for 'fc1.weight'"):
        WeightSharing(model, bits={"conv": 8})
    with pytest.raises(ValueError, match="from 1 to 8"):
        WeightSharing(model, bits=9)


# ----------------------------------------------------------------------------------------------- fine-tuning
def _reference_step_run(model, pruner, sharing, make_opt, steps=6):
    """The update of Deep Compression's eq. 3 done directly: the centroids are the parameters, each weight is
    built from them by indexing (so autograd sums the members' gradients into each centroid)."""
    reference = copy.deepcopy(model)
    centroids = {n: nn.Parameter(c.clone()) for n, c in sharing.codebooks.items()}
    others = [p for n, p in reference.named_parameters() if n not in centroids]
    ref_opt = make_opt([*centroids.values(), *others])
    opt = make_opt(model.parameters())
    sharing.attach(opt)
    pruner.attach(opt)
    torch.manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 20), torch.randint(0, 4, (8,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ref_opt.zero_grad()
        weights = {}
        for name, c in centroids.items():
            w = torch.zeros_like(sharing.params[name])
            weights[name] = w.masked_scatter(sharing.masks[name], c[sharing.labels[name].long()])
        out = torch.func.functional_call(reference, weights, (x,))
        nn.functional.cross_entropy(out, y).backward()
        ref_opt.step()
        sharing.check()
        pruner.check(opt)
        for name, c in centroids.items():  # an empty cluster has no members to follow it (weight decay moves c)
            used = torch.bincount(sharing.labels[name].long(), minlength=c.numel()) > 0
            torch.testing.assert_close(sharing.codebooks[name][used], c.detach()[used], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=5e-4),
    lambda ps: torch.optim.Adam(ps, lr=1e-2),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
], ids=["sgd-momentum", "adam", "adamw"])
def test_centroid_update_matches_the_reference(make_opt):
    model, pruner = _pruned_mlp(seed=2)
    sharing = WeightSharing(model, pruner, bits=3)
    _reference_step_run(model, pruner, sharing, make_opt)


def test_attach_clears_state_from_before_and_handle_detaches():
    model, pruner = _pruned_mlp(seed=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner.attach(opt)
    for _ in range(3):  # momentum buffers that differ within what will be one cluster
        opt.zero_grad()
        model(torch.randn(4, 20)).sum().backward()
        opt.step()
    sharing = WeightSharing(model, pruner, bits=2)
    handle = sharing.attach(opt)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 20)).sum().backward()
        opt.step()
        sharing.check()
    handle.remove()
    opt.zero_grad()
    model(torch.randn(4, 20)).sum().backward()
    opt.step()
    with pytest.raises(AssertionError, match="differ from their shared value"):
        sharing.check()


def test_state_dict_round_trip():
    model, pruner = _pruned_mlp(seed=5)
    sharing = WeightSharing(model, pruner, bits=3)
    state = sharing.state_dict()
    other_model, other_pruner = _pruned_mlp(seed=5)
    other = WeightSharing(other_model, other_pruner, bits=1)
    other.load_state_dict(state)
    for name in sharing.params:
        assert torch.equal(sharing.params[name], other.params[name])
    other.check()


# ----------------------------------------------------------------------------------------------- entropy coding
def test_relative_gaps_with_fillers_hand_case():
    # 3-bit indices: symbol 7 is a filler (skip 7, take nothing). Gaps 0, 2, 16 = 7 + 7 + 2.
    symbols = relative_gaps(np.array([0, 3, 20]), 3)
    assert symbols.tolist() == [0, 2, 7, 7, 2]
    assert positions_from_gaps(symbols, 3).tolist() == [0, 3, 20]


@pytest.mark.parametrize("count", [1, 37, 3 * CHUNK + 5])
def test_huffman_round_trip(count):
    rng = np.random.default_rng(count)
    symbols = np.minimum(rng.geometric(0.3, count) - 1, 31)
    data = huffman_encode(symbols, 32)
    np.testing.assert_array_equal(huffman_decode(data, count, 32), symbols)
    for coder in entropy.CODERS:
        stream = encode_stream(symbols, 32, (coder,))
        assert entropy.stream_coder(stream) == coder
        np.testing.assert_array_equal(decode_stream(stream, count, 32), symbols)


def test_huffman_lengths_are_limited_and_optimal_on_a_hand_case():
    assert huffman_lengths(np.array([5, 1, 1, 2, 0])).tolist() == [1, 3, 3, 2, 0]
    fibonacci = [1, 1]
    while len(fibonacci) < 40:
        fibonacci.append(fibonacci[-1] + fibonacci[-2])
    lengths = huffman_lengths(np.array(fibonacci))
    assert lengths.max() <= entropy.MAX_CODE_BITS and np.sum(2.0 ** -lengths) <= 1


def test_garbage_streams_are_refused():
    symbols = np.arange(50) % 7
    stream = bytearray(encode_stream(symbols, 8, ("huffman",)))
    with pytest.raises(EncodingError):
        decode_stream(bytes([9]) + bytes(stream[1:]), 50, 8)  # unknown coder
    with pytest.raises(EncodingError):
        decode_stream(bytes(stream[:3]), 50, 8)  # truncated
    stream[1:5] = b"\xff\xff\xff\xff"  # code lengths 15 everywhere: not enough codes for the bits that follow
    with pytest.raises(EncodingError):
        decode_stream(bytes(stream), 50, 8)
    with pytest.raises(EncodingError, match="outside the alphabet"):
        decode_stream(encode_stream(symbols, 8, ("zlib",)), 50, 4)


# ----------------------------------------------------------------------------------------------- file format
def _quantized_lenet(bits=5):
    model = magprune.create_model("lenet-300-100")
    pruner = Pruner(model)
    pruner.prune(LayerSparsity(0.92))
    WeightSharing(model, pruner, bits=bits)
    return model


def test_file_round_trip_is_bit_exact_and_smaller(tmp_path):
    model = _quantized_lenet()
    with torch.no_grad():
        model.fc3.weight[0, model.fc3.weight[0] != 0] *= -1  # values on both sides, -0.0 untouched below
        model.fc3.weight[1, 0] = -0.0
    path = tmp_path / "q.safetensors"
    params = save_compressed(model, path)
    assert params["fc1.weight"]["encoding"] == "shared"
    loaded = load_compressed(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded[name].view(torch.int32), tensor.view(torch.int32)), name
    assert path.stat().st_size * 35 < 4 * sum(t.numel() for t in model.state_dict().values())
    table = format_shared_table(shared_rows(params), path.stat().st_size)
    assert re.search(r"\| fc1.weight \| 235,200 \| 8.0% \| [1-5] / [0-9.]+ \| [1-8] / [0-9.]+ \|", table)
    assert "file (with header)" in table


def test_older_version_files_still_load(tmp_path, monkeypatch):
    from magprune.deploy import format as fmt

    model = _quantized_lenet()
    monkeypatch.setattr(fmt, "_shared_encoding", lambda tensor, parts: None)  # what version 2 wrote
    monkeypatch.setattr(fmt, "_params_blob", None)
    from safetensors.numpy import save

    arrays, params = fmt._compress(model)
    header = {"format": fmt.FORMAT, "format_version": "2", "params": json.dumps(params)}
    (tmp_path / "v2.safetensors").write_bytes(save(arrays, metadata=header))
    monkeypatch.undo()
    loaded = load_compressed(tmp_path / "v2.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded[name], tensor)


def _forge(tmp_path, model, edit):
    """A file whose shared part or metadata ``edit`` changed, with every checksum made consistent again."""
    from safetensors import safe_open
    from safetensors.numpy import load_file
    from safetensors.numpy import save as save_arrays

    from magprune.deploy.format import _params_blob

    path = tmp_path / "good.safetensors"
    save_compressed(model, path)
    arrays = load_file(str(path))
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata()
    params = json.loads(zlib.decompress(arrays.pop("__params__").tobytes()))
    blob = bytearray(arrays["fc2.weight/shared"].tobytes())
    blob = edit(blob, params["fc2.weight"])
    arrays["fc2.weight/shared"] = np.frombuffer(bytes(blob), dtype=np.uint8)
    params["fc2.weight"]["crc32"]["shared"] = zlib.crc32(bytes(blob))
    arrays["__params__"], metadata["params_crc32"] = _params_blob(params)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(save_arrays(arrays, metadata=metadata))
    return bad


def _set(key, value):
    def edit(blob, meta):
        target = meta["shared"] if key in meta["shared"] else meta
        target[key] = value
        return blob
    return edit


@pytest.mark.parametrize(("edit", "match"), [
    (_set("index_bits", 9), "index_bits 9"),
    (_set("values", 300), "do not fit"),
    (_set("nnz", 10**6), "do not fit"),
    (_set("gaps", 5), "relative indices give|do not fit"),
    (_set("shape", [10**12]), "more than this reader accepts"),
    (lambda blob, meta: blob[:-3], "do not fit the"),
    (lambda blob, meta: blob[:4 * meta["shared"]["values"]] + bytes([7]) + blob[4 * meta["shared"]["values"] + 1:],
     "unknown coder"),
], ids=["index-bits", "values", "nnz", "gaps", "huge-shape", "truncated", "coder"])
def test_hostile_shared_files_are_refused(tmp_path, edit, match):
    bad = _forge(tmp_path, _quantized_lenet(), edit)
    with pytest.raises(CompressedFormatError, match=f"bad.safetensors.*fc2.weight.*({match})"):
        load_compressed(bad)


def test_a_flipped_byte_is_refused(tmp_path):
    path = tmp_path / "q.safetensors"
    save_compressed(_quantized_lenet(), path)
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(CompressedFormatError, match="q.safetensors.*checksum mismatch"):
        load_compressed(path)


# ----------------------------------------------------------------------------------------------- kernel
@pytest.mark.parametrize(("n_out", "n_in", "k"), [(9, 13, 4), (40, 255, 16), (33, 300, 256)])
def test_quantized_kernel_matches_the_reference(n_out, n_in, k):
    rng = np.random.default_rng(n_in)
    mask = rng.random((n_out, n_in)) < 0.3
    mask[3] = False  # an empty row
    rows, cols = np.nonzero(mask)
    codebook = rng.standard_normal(k).astype(np.float32)
    labels = rng.integers(0, k, rows.size)
    weight = np.zeros((n_out, n_in), dtype=np.float32)
    weight[rows, cols] = codebook[labels]
    product = QuantizedProduct(rows, cols, labels, codebook, n_out, n_in)
    assert product.cols.dtype == (np.uint8 if n_in <= 255 else np.uint16)  # n_in: the padding's zero slot
    x = rng.standard_normal(n_in).astype(np.float32)
    out = np.full(n_out, 0.5, dtype=np.float32)
    product.matvec(x, out)
    np.testing.assert_allclose(out, 0.5 + weight.astype(np.float64) @ x, rtol=1e-5, atol=1e-5)


def test_quantized_kernel_on_threads(monkeypatch):
    monkeypatch.setattr(qkernel, "PARALLEL_MIN_NONZEROS", 0)
    rng = np.random.default_rng(1)
    rows, cols = np.nonzero(rng.random((64, 100)) < 0.2)
    labels = rng.integers(0, 8, rows.size)
    codebook = rng.standard_normal(8).astype(np.float32)
    product = QuantizedProduct(rows, cols, labels, codebook, 64, 100)
    x = rng.standard_normal(100).astype(np.float32)
    one, two = np.zeros(64, np.float32), np.zeros(64, np.float32)
    product.matvec(x, one, 1)
    product.matvec(x, two, 2)
    np.testing.assert_allclose(one, two, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        QuantizedProduct(rows, cols, labels + 8, codebook, 64, 100)


@pytest.mark.parametrize("n_in", [200, 300, 70_000])  # uint8, uint16 and uint32 columns
def test_quantized_matvec_at_every_group_count_and_tail(n_in):
    """Row r holds r nonzeros of one codebook entry (ceil(r / 4) groups, the last padded): every count of whole
    four-group passes and every tail of one to three groups of the AVX-512 kernel, and the scalar kernel's pairs."""
    rng = np.random.default_rng(n_in)
    n_out = 50
    rows = np.concatenate([np.full(r, r) for r in range(n_out)])
    cols = np.concatenate([np.sort(rng.choice(n_in, size=r, replace=False)) for r in range(n_out)])
    labels = rows % 3
    codebook = np.array([0.5, -1.25, 2.0], dtype=np.float32)
    weight = np.zeros((n_out, n_in), dtype=np.float64)
    weight[rows, cols] = codebook[labels]
    product = QuantizedProduct(rows, cols, labels, codebook, n_out, n_in)
    x = rng.standard_normal(n_in).astype(np.float32)
    out = np.full(n_out, 0.25, dtype=np.float32)
    product.matvec(x, out)
    np.testing.assert_allclose(out, 0.25 + weight @ x, rtol=1e-5, atol=1e-5)


def test_quantized_matvec_reads_nothing_past_x():
    """Padded slots point at column n_in: the AVX-512 kernel masks them out of its gathers and reads x in place, the
    scalar one reads a copy followed by a zero. Either way what lies after x (here NaN) is never read."""
    rng = np.random.default_rng(9)
    n_out, n_in = 30, 500
    rows, cols = np.nonzero(rng.random((n_out, n_in)) < 0.1)
    labels = rng.integers(0, 5, rows.size)
    codebook = rng.standard_normal(5).astype(np.float32)
    weight = np.zeros((n_out, n_in), dtype=np.float64)
    weight[rows, cols] = codebook[labels]
    product = QuantizedProduct(rows, cols, labels, codebook, n_out, n_in)
    assert (product.cols == n_in).any()  # some groups are padded
    buffer = np.full(n_in + 16, np.nan, dtype=np.float32)
    buffer[:n_in] = rng.standard_normal(n_in)
    out = np.zeros(n_out, dtype=np.float32)
    product.matvec(buffer[:n_in], out)
    np.testing.assert_allclose(out, weight @ buffer[:n_in], rtol=1e-5, atol=1e-5)


def test_quantized_linear_one_example_path_follows_its_bias_and_copies():
    import pickle

    torch.manual_seed(2)
    layer = nn.Linear(300, 40)
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight) < 0.3)
    WeightSharing(layer, bits=4)
    quantized = QuantizedLinear.from_linear(layer)
    x = torch.randn(1, 300)

    def expected(module: QuantizedLinear) -> torch.Tensor:
        return x @ layer.weight.detach().T + torch.from_numpy(module.bias_array)

    with torch.no_grad():
        first, second = quantized(x), quantized(x)
        assert (quantized._one is not None) == quantized.product.reads_x_in_place
        torch.testing.assert_close(second, expected(quantized), rtol=1e-5, atol=1e-5)
        assert first.data_ptr() != second.data_ptr()
        torch.testing.assert_close(quantized(x[0]), expected(quantized)[0], rtol=1e-5, atol=1e-5)
        quantized.bias_array += 1.0  # in place
        torch.testing.assert_close(quantized(x), expected(quantized), rtol=1e-5, atol=1e-5)
        quantized.bias_array = np.random.default_rng(0).standard_normal(40).astype(np.float32)  # replaced
        torch.testing.assert_close(quantized(x), expected(quantized), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(quantized(x), expected(quantized), rtol=1e-5, atol=1e-5)
        for clone in (copy.deepcopy(quantized), pickle.loads(pickle.dumps(quantized))):  # plans do not travel
            assert clone._one is None and not clone.product._plans
            for _ in range(2):
                torch.testing.assert_close(clone(x), expected(quantized), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("n_in", "m", "blocks"), [(200, 8, 1), (200, 40, 2), (300, 72, 1), (300, 16, 3)])
@pytest.mark.parametrize("threads", [1, 2])
def test_batched_quantized_kernel_matches_the_reference(monkeypatch, n_in, m, blocks, threads):
    """The batched product over x transposed (its row n_in zero): every chunk width (72 = 64 + 8, 40 = 32 + 8),
    several blocks, uint8 and uint16 columns, empty rows and runs that do not fill a group, on one and two threads."""
    monkeypatch.setattr(qkernel, "PARALLEL_MIN_WORK", 0)
    rng = np.random.default_rng(m + n_in)
    n_out, k = 37, 16
    mask = rng.random((n_out, n_in)) < 0.2
    mask[[0, 5, 36]] = False  # empty rows, first and last among them
    mask[7, :3] = True
    mask[7, 3:] = False  # one row of three nonzeros: one padded group
    rows, cols = np.nonzero(mask)
    codebook = rng.standard_normal(k).astype(np.float32)
    labels = rng.integers(0, k, rows.size)
    weight = np.zeros((n_out, n_in), dtype=np.float64)
    weight[rows, cols] = codebook[labels]
    product = QuantizedProduct(rows, cols, labels, codebook, n_out, n_in)
    x = np.zeros((blocks, n_in + 1, m), dtype=np.float32)
    x[:, :n_in] = rng.standard_normal((blocks, n_in, m))
    out = np.full((blocks, n_out, m), 0.5, dtype=np.float32)
    product.matmul(x, out, threads)
    np.testing.assert_allclose(out, 0.5 + weight @ x[:, :n_in], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 8"):
        product.matmul(x[:, :, :m - 1].copy(), out[:, :, :m - 1].copy(), threads)
    with pytest.raises(ValueError, match="x \\(B, "):
        product.matmul(x[:, :n_in].copy(), out, threads)  # no zero row


@pytest.mark.parametrize("shape", [(2, 300), (13, 300), (33, 300), (70, 300), (3, 5, 300), (0, 300)])
def test_quantized_linear_runs_batches_through_the_batched_kernel(shape):
    torch.manual_seed(1)
    layer = nn.Linear(300, 40)
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight) < 0.3)
    WeightSharing(layer, bits=4)
    quantized = QuantizedLinear.from_linear(layer)
    x = torch.randn(*shape)
    with torch.no_grad():
        y = quantized(x)
        assert y.shape == (*shape[:-1], 40)
        torch.testing.assert_close(y, layer(x), rtol=1e-4, atol=1e-4)


def test_quantized_kernel_called_from_two_threads_at_once():
    """Each call pads its own copy of x: one scratch copy on the product, shared by concurrent calls, let one call's
    kernel read the other's input (wrong results in 18 of 600 calls before the fix)."""
    import threading

    rng = np.random.default_rng(5)
    n_out, n_in = 512, 4096
    rows, cols = np.nonzero(rng.random((n_out, n_in)) < 0.3)
    labels = rng.integers(0, 32, rows.size)
    codebook = rng.standard_normal(32).astype(np.float32)
    product = QuantizedProduct(rows, cols, labels, codebook, n_out, n_in)
    weight = np.zeros((n_out, n_in), dtype=np.float64)
    weight[rows, cols] = codebook[labels]
    xs = [rng.standard_normal(n_in).astype(np.float32) for _ in range(2)]
    wrong = [0, 0]

    def calls(i: int) -> None:
        want = weight @ xs[i]
        for _ in range(300):
            out = np.zeros(n_out, dtype=np.float32)
            product.matvec(xs[i], out, 2)
            wrong[i] += not np.allclose(out, want, rtol=1e-4, atol=1e-3)

    threads = [threading.Thread(target=calls, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == [0, 0]


def test_load_quantized_runs_the_file(tmp_path):
    model = _quantized_lenet(bits=4).eval()
    path = tmp_path / "q.safetensors"
    save_compressed(model, path)
    fast = load_quantized(magprune.create_model("lenet-300-100"), path)
    assert isinstance(fast.fc1, QuantizedLinear) and fast.fc1.product.k <= 16
    x = torch.randn(3, 784)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast(x[:1]), model(x[:1]), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="more than 256"):
        QuantizedLinear.from_linear(nn.Linear(30, 30))


# ----------------------------------------------------------------------------------------------- pipeline step
TINY_DC = """
name: digits-dc
seed: 0
model: {name: lenet-300-100, kwargs: {in_features: 64}}
data: {dataset: digits}
train: {optimizer: sgd, lr: 0.05, momentum: 0.9, epochs: 1, batch_size: 64, regularization: l2, strength: 1.0e-4}
prune:
  - criterion: density
    density: {fc1: 0.2, fc2: 0.3, fc3: 0.5}
    retrain: {epochs: 1, lr_fraction: 0.1}
quantize: {bits: {fc1: 4, fc: 5}, epochs: 2, lr_fraction: 0.01}
"""


def test_quantize_step_runs_and_resumes_to_the_same_result(tmp_path, monkeypatch):
    import yaml

    from magprune.experiment import stages
    from magprune.experiment.config import from_dict
    from magprune.experiment.pipeline import run_experiment

    config = from_dict(yaml.safe_load(TINY_DC))
    whole = run_experiment(config, tmp_path / "whole", progress=False, echo=lambda line: None)
    q = whole["quantize"]
    assert q["bits"] == {"fc1.weight": 4, "fc2.weight": 5, "fc3.weight": 5} and q["file_ratio"] > 5
    assert "## Deep Compression" in (tmp_path / "whole" / "report.md").read_text()
    load_quantized(magprune.create_model("lenet-300-100", in_features=64),
                   tmp_path / "whole" / "model.quantized.safetensors")
    from magprune.cli import main

    assert main(["export", str(tmp_path / "whole"), "--format", "quantized", "--out", str(tmp_path / "e.st")]) == 0
    assert load_compressed(tmp_path / "e.st").keys() == load_compressed(
        tmp_path / "whole" / "model.quantized.safetensors").keys()
    assert main(["export", str(tmp_path / "whole"), "--format", "quantized", "--bits", "x=3"]) == 2

    class Interrupted(Exception):
        pass

    checkpoint = stages.RunContext.checkpoint

    def stop_after_first_fine_tuning_epoch(ctx, state):
        checkpoint(ctx, state)
        train = (state or {}).get("train")
        if ctx.stages[ctx.stage].name == "quantize" and train and train["epoch"] == 1 and not train.get("batch"):
            raise Interrupted

    monkeypatch.setattr(stages.RunContext, "checkpoint", stop_after_first_fine_tuning_epoch)
    with pytest.raises(Interrupted):
        run_experiment(config, tmp_path / "cut", progress=False, echo=lambda line: None)
    monkeypatch.undo()
    resumed = run_experiment(config, tmp_path / "cut", progress=False, echo=lambda line: None, resume=True)
    assert resumed["error_after"] == whole["error_after"]
    assert resumed["quantize"]["error_fine_tuned"] == q["error_fine_tuned"]
    whole_model, cut_model = (tmp_path / d / "model.safetensors" for d in ("whole", "cut"))
    assert whole_model.read_bytes() == cut_model.read_bytes()


@pytest.mark.parametrize(("section", "match"), [
    ({"bits": 9}, r"quantize.bits: must be an integer in \[1, 8\]"),
    ({"bits": {"fc": 0}}, r"quantize.bits.fc"),
    ({"init": "kmeans++"}, "quantize.init: must be one of"),
    ({"epochs": -1}, "quantize.epochs"),
    ({"lr": 0.1}, r"quantize: unknown key\(s\) \['lr'\]"),
])
def test_quantize_config_is_validated(section, match):
    from magprune.experiment.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match=match):
        from_dict({"quantize": section})
    assert from_dict({}).quantize is None
    assert from_dict({"quantize": {"bits": {"conv": 8, "fc": 5}}}).quantize.bits == {"conv": 8, "fc": 5}
