"""Data room: MNIST and Fashion-MNIST from IDX files (gz or raw), checksummed download, and the bundled digits set."""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from magprune.fileio import write_atomic

ENV_VAR = "MAGPRUNE_DATA"

# IDX type codes (http://yann.lecun.com/exdb/mnist/): values are big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class IdxDataset:
    """Where an IDX dataset's four files come from; sha256 is of the *decompressed* bytes, so .gz or raw both check."""

    name: str
    mirrors: tuple[str, ...]
    files: dict[str, str]  # stem -> sha256 of the decompressed file


DATASETS: dict[str, IdxDataset] = {
    "mnist": IdxDataset(
        name="mnist",
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/"),
        files={
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
    ),
    "fashion-mnist": IdxDataset(
        name="fashion-mnist",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        # sha256 of the decompressed files of Debian's dataset-fashion-mnist (0.0~git20200523), the upstream release.
        files={
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
    ),
}

# Debian's dataset-fashion-mnist package puts the files here.
SYSTEM_DIRS = {"fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),)}

DATASET_NAMES = ("digits", *DATASETS)


class DataError(FileNotFoundError):
    """A dataset file is missing, corrupt or fails its checksum."""


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) into a numpy array of its declared type and shape."""
    path = Path(path)
    raw = _read_bytes(path)
    return parse_idx(raw, str(path))


def parse_idx(raw: bytes, source: str = "<bytes>") -> np.ndarray:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{source}: not an IDX file (bad magic number {raw[:4].hex()})")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{source}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{source}: IDX header says shape {shape} ({expected} bytes) but the file has {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: corrupt gzip file ({exc})") from exc
    return data


def candidate_dirs(dataset: str, data_dir: str | os.PathLike[str] | None) -> list[Path]:
    """Directories searched for ``dataset``'s files: ``data_dir`` (or $MAGPRUNE_DATA), each also with ``/<dataset>``."""
    roots = [Path(data_dir)] if data_dir is not None else ([Path(os.environ[ENV_VAR])] if os.environ.get(ENV_VAR)
                                                            else [])
    dirs = [d for root in roots for d in (root, root / dataset)]
    if data_dir is None:
        dirs += list(SYSTEM_DIRS.get(dataset, ()))
    return dirs


def find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def locate(dataset: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory holding all four IDX files of ``dataset``, or a DataError naming where it looked and what lacks."""
    spec = _spec(dataset)
    dirs = candidate_dirs(dataset, data_dir)
    if not dirs:
        raise DataError(f"{dataset}: no data directory given; pass --data-dir DIR or set ${ENV_VAR} "
                        f"to a directory holding {', '.join(spec.files)} (.gz or raw)")
    for d in dirs:
        if all(find_file(d, stem) for stem in spec.files):
            return d
    first = dirs[0]
    missing = [stem for stem in spec.files if not find_file(first, stem)]
    raise DataError(f"{dataset}: {first} lacks {', '.join(m + '[.gz]' for m in missing)}"
                    + (f" (also looked in {', '.join(str(d) for d in dirs[1:])})" if len(dirs) > 1 else "")
                    + "; download it with `download` in the data section of the config or pass --data-dir")


def _spec(dataset: str) -> IdxDataset:
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)} for IDX files, got {dataset!r}")
    return DATASETS[dataset]


Fetch = Callable[[str], bytes]


def _urlopen(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def download(dataset: str, data_dir: str | os.PathLike[str], *, fetch: Fetch = _urlopen) -> Path:
    """Download ``dataset``'s missing files into ``data_dir`` (as .gz), verifying each one's sha256; returns the dir.

    A file that fails its checksum on every mirror is not written, and a DataError says which file and why.
    """
    spec = _spec(dataset)
    directory = Path(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    for stem, sha in spec.files.items():
        if find_file(directory, stem):
            continue
        problems = []
        for mirror in spec.mirrors:
            url = mirror + stem + ".gz"
            try:
                blob = fetch(url)
                check_bytes(parse_bytes_checked(blob, url), sha, url)
            except (OSError, DataError) as exc:
                problems.append(f"{url}: {exc}")
                continue
            write_atomic(directory / (stem + ".gz"), blob)
            break
        else:
            raise DataError(f"{dataset}: could not get {stem} into {directory}: " + "; ".join(problems))
    return directory


def parse_bytes_checked(blob: bytes, source: str) -> bytes:
    raw = gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else blob
    parse_idx(raw, source)
    return raw


def check_bytes(raw: bytes, sha256: str, source: str) -> None:
    if sha256 and hashlib.sha256(raw).hexdigest() != sha256:
        raise DataError(f"{source}: sha256 {hashlib.sha256(raw).hexdigest()} does not match the expected {sha256}")


def verify(dataset: str, directory: str | os.PathLike[str]) -> None:
    """Check every file of ``dataset`` in ``directory`` against its sha256 (where one is known)."""
    spec = _spec(dataset)
    for stem, sha in spec.files.items():
        path = find_file(Path(directory), stem)
        if path is None:
            raise DataError(f"{dataset}: {directory} lacks {stem}[.gz]")
        check_bytes(_read_bytes(path), sha, str(path))


Split = tuple[Tensor, Tensor]


def load_idx_dataset(dataset: str, data_dir: str | os.PathLike[str] | None = None, *,
                     download_missing: bool = False) -> tuple[Split, Split]:
    """(train, test) of MNIST-like IDX data: images float32 [N, 1, H, W] scaled to [0, 1], labels int64."""
    if download_missing:
        target = data_dir if data_dir is not None else os.environ.get(ENV_VAR)
        if target is None:
            raise DataError(f"{dataset}: download needs a directory; pass --data-dir DIR or set ${ENV_VAR}")
        download(dataset, Path(target))
    directory = locate(dataset, data_dir)

    def split(prefix: str) -> Split:
        images = read_idx(find_file(directory, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(find_file(directory, f"{prefix}-labels-idx1-ubyte"))
        if len(images) != len(labels):
            raise DataError(f"{dataset}: {directory} has {len(images)} {prefix} images but {len(labels)} labels")
        x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        return x, torch.from_numpy(labels.astype(np.int64))

    return split("train"), split("t10k")


def load_digits_split(seed: int = 0, test_fraction: float = 0.25) -> tuple[Split, Split]:
    """Digits (1797 real 8x8 scans) scaled to [0, 1], split into train and test tensors with a fixed seed."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def load_dataset(dataset: str, data_dir: str | os.PathLike[str] | None = None, *, download_missing: bool = False,
                 seed: int = 0) -> tuple[Split, Split]:
    """Load ``digits`` (bundled, offline), ``mnist`` or ``fashion-mnist`` as whole tensors (train, test)."""
    if dataset == "digits":
        return load_digits_split(seed)
    return load_idx_dataset(dataset, data_dir, download_missing=download_missing)


def hold_out(train: Split, validation: int) -> tuple[Split, Split]:
    """(train, validation): the last ``validation`` examples of ``train`` held out, the rest left to train on."""
    n = len(train[1])
    if not 0 <= validation < n:
        raise ValueError(f"data.validation: must hold out fewer than the {n} training examples, got {validation}")
    keep = n - validation
    return (train[0][:keep], train[1][:keep]), (train[0][keep:], train[1][keep:])
