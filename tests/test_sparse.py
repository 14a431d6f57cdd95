import numpy as np
import pytest
import torch
from torch import nn

import magprune
from magprune.sparse import (
    CompressedFormatError,
    SparseConv2d,
    SparseLinear,
    encode_csr,
    encode_rel4,
    load_compressed,
    load_compressed_into,
    save_compressed,
    size_report,
    smallest_uint,
    sparsify,
)


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
    save_compressed(model, path)
    dense = sum(4 * t.numel() for t in model.state_dict().values())
    assert dense / path.stat().st_size >= 10
    rows = size_report(model)
    assert {r.name for r in rows} == set(model.state_dict())
    assert sum(r.compressed_bytes for r in rows) < path.stat().st_size


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
    assert [d.name for d in never.sparsify_decisions] == ["fc1", "fc2"]
    assert not any(d.converted for d in never.sparsify_decisions)
    assert all(d.dense_ms > 0 and d.sparse_ms > 0 for d in never.sparsify_decisions)
    with torch.inference_mode():
        torch.testing.assert_close(forced(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("min_work", [0, 1 << 62])  # parallel and serial kernels
def test_linear_kernels_parallel_and_serial_with_padded_batches(monkeypatch, min_work):
    from magprune import _kernels

    monkeypatch.setattr(_kernels, "PARALLEL_MIN_WORK", min_work)
    torch.manual_seed(4)
    linear = nn.Linear(257, 33)
    with torch.no_grad():
        linear.weight.mul_(torch.rand_like(linear.weight) < 0.3)
        linear.weight[5] = 0  # an empty row
    sparse = SparseLinear(linear)
    for batch in (1, 3, 130):  # 130 = 3 blocks of 44, two padding rows
        x = torch.randn(batch, 257)
        with torch.inference_mode():
            torch.testing.assert_close(sparse(x), linear(x), rtol=1e-4, atol=1e-5)
