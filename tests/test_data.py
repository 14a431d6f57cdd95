"""Data: the IDX reader on files made here (gz and raw), locating files, checksummed download, real MNIST."""

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from magprune.experiment import data
from magprune.experiment.data import DataError, load_idx_dataset, locate, read_idx

MNIST = Path(os.environ.get("MAGPRUNE_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist")


def idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.dtype("uint8"): 0x08, np.dtype("int16"): 0x0B, np.dtype("int32"): 0x0C,
             np.dtype("float32"): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", ["uint8", "int32", "float32"])
def test_read_idx_round_trips(tmp_path, compress, dtype):
    rng = np.random.default_rng(0)
    array = (rng.integers(0, 255, size=(5, 3, 4)) * (1 if dtype != "float32" else 0.37)).astype(dtype)
    raw = idx_bytes(array)
    path = tmp_path / ("x.gz" if compress else "x")
    path.write_bytes(gzip.compress(raw) if compress else raw)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.shape == (5, 3, 4)
    np.testing.assert_array_equal(out, array)


def test_read_idx_rejects_bad_files(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(path)
    path.write_bytes(idx_bytes(np.zeros((4, 2), np.uint8))[:-3])
    with pytest.raises(DataError, match=r"shape \(4, 2\)"):
        read_idx(path)


def make_fake_mnist(directory: Path, n: int = 12, compress: bool = True) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for prefix in ("train", "t10k"):
        files = {f"{prefix}-images-idx3-ubyte": rng.integers(0, 256, (n, 28, 28)).astype(np.uint8),
                 f"{prefix}-labels-idx1-ubyte": rng.integers(0, 10, (n,)).astype(np.uint8)}
        for stem, array in files.items():
            raw = idx_bytes(array)
            (directory / (stem + (".gz" if compress else ""))).write_bytes(gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize("compress", [False, True])
def test_load_idx_dataset_from_a_directory_or_env(tmp_path, monkeypatch, compress):
    make_fake_mnist(tmp_path / "mnist", compress=compress)
    (x, y), (xt, _yt) = load_idx_dataset("mnist", tmp_path / "mnist")
    assert x.shape == (12, 1, 28, 28) and y.shape == (12,) and xt.shape == (12, 1, 28, 28)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    monkeypatch.setenv("MAGPRUNE_DATA", str(tmp_path))  # the env var may name the parent of mnist/
    assert locate("mnist") == tmp_path / "mnist"


def test_missing_file_error_names_directory_and_file(tmp_path):
    make_fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as info:
        locate("mnist", tmp_path)
    assert str(tmp_path) in str(info.value) and "t10k-labels-idx1-ubyte" in str(info.value)
    assert "train-images" not in str(info.value)


def test_download_verifies_checksums(tmp_path, monkeypatch):
    source = tmp_path / "source"
    make_fake_mnist(source)
    blobs = {p.name: p.read_bytes() for p in source.iterdir()}
    sums = {name.removesuffix(".gz"): hashlib.sha256(gzip.decompress(b)).hexdigest() for name, b in blobs.items()}
    spec = data.IdxDataset("mnist", ("https://a/", "https://b/"), sums)
    monkeypatch.setitem(data.DATASETS, "mnist", spec)
    fetched = []

    def fetch(url):
        fetched.append(url)
        return blobs[url.rsplit("/", 1)[1]]

    target = data.download("mnist", tmp_path / "got", fetch=fetch)
    assert sorted(p.name for p in target.iterdir()) == sorted(blobs)
    assert len(fetched) == 4
    data.verify("mnist", target)

    # a corrupted file on the first mirror is rejected, the second mirror's good copy is used
    def corrupt_first(url):
        blob = blobs[url.rsplit("/", 1)[1]]
        if url.startswith("https://a/"):
            raw = bytearray(gzip.decompress(blob))
            raw[-1] ^= 0xFF
            return gzip.compress(bytes(raw))
        return blob

    target = data.download("mnist", tmp_path / "got2", fetch=corrupt_first)
    data.verify("mnist", target)

    # when every mirror is bad nothing is written and the error names the file
    def always_bad(url):
        return gzip.compress(idx_bytes(np.zeros(3, np.uint8)))

    with pytest.raises(DataError, match="sha256") as info:
        data.download("mnist", tmp_path / "bad", fetch=always_bad)
    assert f"could not get {next(iter(sums))} into" in str(info.value)
    assert not list((tmp_path / "bad").iterdir())


@pytest.mark.skipif(not (MNIST / "train-images-idx3-ubyte.gz").exists() and not (MNIST / "mnist").exists(),
                    reason="real MNIST not available (set MAGPRUNE_DATA)")
def test_real_mnist_loads_and_matches_its_checksums():
    directory = locate("mnist", MNIST)
    data.verify("mnist", directory)
    (x, y), (xt, _yt) = load_idx_dataset("mnist", directory)
    assert x.shape == (60000, 1, 28, 28) and xt.shape == (10000, 1, 28, 28)
    assert y.bincount().tolist()[:3] == [5923, 6742, 5958]
    assert abs(float(x.mean()) - 0.1307) < 1e-3


def test_atomic_writes_get_normal_file_permissions(tmp_path):
    import os
    import stat

    from magprune.fileio import write_atomic

    write_atomic(tmp_path / "f.bin", b"x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == 0o666 & ~mask
    assert (tmp_path / "f.bin").read_bytes() == b"x" and not list(tmp_path.glob("*.tmp"))
