"""The sparse kernels' thread pool (tasks shared between the caller and workers that spin, sleep and wake) and the
bit-packed mask kernel."""

import copy
import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from magprune.kernels import bitmask, csr, memory, pool, transpose
from magprune.kernels.csr import CSRProduct


def _product(rows: int, n_in: int, seed: int) -> tuple[CSRProduct, np.ndarray]:
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((rows, n_in)) * (rng.random((rows, n_in)) < 0.2)).astype(np.float32)
    indptr = np.concatenate([[0], np.cumsum((weight != 0).sum(axis=1))]).astype(np.int32)
    cols = np.nonzero(weight)[1].astype(np.uint16)
    return CSRProduct(indptr, cols, weight[weight != 0], n_in, tile_rows=128), weight


def _close(out: np.ndarray, exact: np.ndarray) -> bool:
    return bool(np.allclose(out, exact, rtol=1e-4, atol=1e-4))


@pytest.fixture
def parallel_always(monkeypatch):
    monkeypatch.setattr(csr, "PARALLEL_MIN_WORK", 0)
    monkeypatch.setattr(csr, "PARALLEL_MIN_NONZEROS", 0)


@pytest.fixture(params=["openmp", "own"])
def backend(request, monkeypatch):
    """Plans on torch's OpenMP team (where torch has one) and on this project's own worker threads."""
    if request.param == "openmp" and pool.openmp_parallel() is None:
        pytest.skip("no GNU OpenMP runtime loaded (torch without libgomp)")
    monkeypatch.setattr(pool, "OPENMP", request.param == "openmp")
    monkeypatch.setattr(pool, "_pool", None)  # a fresh pool of that kind, closed after the test
    yield request.param
    if pool._pool is not None:
        pool._pool.close()


def test_torchs_openmp_team_runs_the_plans_where_torch_has_one():
    import torch

    has_gomp = sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info()
    assert (pool.openmp_parallel() is not None) == has_gomp
    assert (pool.get_pool().openmp is not None) == (has_gomp and pool.OPENMP)
    script = "import torch; from magprune.kernels import pool; print(pool.get_pool().openmp is None)"
    for setting, expected in (("own", "True"), ("openmp", str(not has_gomp))):
        done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "MAGPRUNE_POOL": setting},
                              capture_output=True, text=True, timeout=120, check=True)
        assert done.stdout.strip() == expected


def test_machine_info_records_where_the_kernels_threads_come_from(monkeypatch):
    from magprune.environment import describe, machine_info

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    info = machine_info()
    assert info["kernel_threads"] == ("openmp" if pool.OPENMP and pool.openmp_parallel() is not None else "own")
    assert info["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setattr(pool, "OPENMP", False)
    assert machine_info()["kernel_threads"] == "own"
    assert describe(machine_info()).endswith("kernels on own threads (OMP_WAIT_POLICY PASSIVE)")


@pytest.mark.parametrize("threads", [2, 3])
def test_an_openmp_plan_is_shared_by_the_team_and_matches_dense(parallel_always, backend, threads):
    product, weight = _product(300, 500, 4)
    x = np.random.default_rng(2).standard_normal((3, 500, 24)).astype(np.float32)
    for _ in range(5):  # again and again: the team (or the workers) idle, spinning or asleep in between
        out = np.zeros((3, 300, 24), np.float32)
        product.matmul(x, out, threads)
        assert _close(out, weight @ x)
        time.sleep(0.01)


def test_workers_that_went_to_sleep_are_woken_for_the_next_plan(parallel_always, monkeypatch):
    monkeypatch.setattr(pool, "OPENMP", False)  # this pool's own workers
    monkeypatch.setattr(pool, "_pool", None)
    product, weight = _product(300, 500, 0)
    x = np.random.default_rng(1).standard_normal(500).astype(np.float32)
    for _ in range(3):
        out = np.zeros(300, np.float32)
        product.matvec(x, out, 3)
        assert _close(out, weight @ x)
        workers = pool.get_pool()
        deadline = time.monotonic() + 5
        while not all(workers.states[i * pool._STATE_STRIDE] == 1 for i in range(len(workers.threads))):
            assert time.monotonic() < deadline, "workers never went to sleep after their spin"
            time.sleep(10 * pool.SPIN_SECONDS)
    assert len(workers.threads) >= 2


def test_plans_from_several_python_threads_at_once(parallel_always, backend):
    products = [_product(64 + 7 * i, 300, i) for i in range(4)]
    failures = []

    def work(product, weight, seed):
        rng = np.random.default_rng(seed)
        for _ in range(30):
            x = rng.standard_normal((2, 300, 16)).astype(np.float32)
            out = np.zeros((2, weight.shape[0], 16), np.float32)
            product.matmul(x, out, 2)
            if not _close(out, weight @ x):
                failures.append(seed)

    threads = [threading.Thread(target=work, args=(p, w, i)) for i, (p, w) in enumerate(products)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert not failures


def _child_product(queue):
    csr.PARALLEL_MIN_NONZEROS = 0
    product, weight = _product(200, 300, 3)
    x = np.ones(300, np.float32)
    out = np.zeros(200, np.float32)
    product.matvec(x, out, 2)
    queue.put((_close(out, weight @ x), pool.get_pool().openmp is None))


def test_a_forked_child_gets_its_own_pool(parallel_always, backend):
    product, _ = _product(200, 300, 3)
    out = np.zeros(200, np.float32)
    product.matvec(np.ones(300, np.float32), out, 2)  # the parent's pool is running
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_product, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == (True, True)  # right, and on the child's own workers (libgomp is not fork-safe)


@pytest.mark.parametrize("threads", [2, 3, 5])
@pytest.mark.parametrize("batches", [1, 4, 13])
def test_direct_conv_split_by_image_or_by_channel(parallel_always, threads, batches):
    rng = np.random.default_rng(batches)
    out_h, row_step, w8 = 5, 20, 8
    product, weight = _product(11, 150, threads)  # columns are offsets into one image of product.n_in floats
    image = product.n_in
    x = rng.standard_normal(batches * image + row_step * out_h + w8).astype(np.float32)
    out = np.zeros((batches, 11, out_h, w8), np.float32)
    product.conv_rows(x, out, out_h, row_step, threads)
    for b in range(batches):
        for oh in range(out_h):
            start = b * image + oh * row_step
            window = np.stack([x[start + c:start + c + w8] for c in range(image)])
            assert _close(out[b, :, oh], weight @ window)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("batches", [1, 4, 13])
@pytest.mark.parametrize("m", [8, 72, 136])  # one chunk; 64 + 8; 2 x 64 + 8
def test_flat_product_split_by_image_or_by_row(parallel_always, threads, batches, m):
    rng = np.random.default_rng(batches + m)
    product, weight = _product(11, 150, threads)  # columns are offsets into one image of product.n_in floats
    image = product.n_in
    x = rng.standard_normal(batches * image + m).astype(np.float32)
    out = np.zeros((batches, 11, m), np.float32)
    product.flat_plan(batches, m, threads).run(x.ctypes.data, out.ctypes.data)
    for b in range(batches):
        window = np.stack([x[b * image + c:b * image + c + m] for c in range(image)])
        assert _close(out[b], weight @ window)


def test_a_plan_too_large_for_the_task_counter_is_refused():
    with pytest.raises(ValueError, match="at most"):
        pool.Plan([[]] * (pool.MAX_TASKS + 1), 2)


def test_large_arrays_move_to_huge_pages_with_their_values():
    small = np.arange(10, dtype=np.float32)
    assert memory.huge_page_array(small) is small
    large = np.random.default_rng(0).standard_normal(memory.HUGE_PAGE_MIN_BYTES // 4 + 3).astype(np.float32)
    moved = memory.huge_page_array(large)
    assert moved.dtype == large.dtype and moved.shape == large.shape
    np.testing.assert_array_equal(moved, large)
    if moved is not large:  # Linux with madvise: the copy starts on a huge-page boundary
        assert moved.ctypes.data % memory.HUGE_PAGE == 0


def _transparent_huge_pages() -> bool:
    try:
        return "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not _transparent_huge_pages(), reason="no transparent huge pages on this host")
def test_huge_page_arrays_are_private_memory_the_kernel_backs_with_huge_pages():
    """Python's mmap of -1 maps MAP_SHARED by default: shared memory, which transparent huge pages skip unless
    shmem_enabled says otherwise (it said never on this project's hosts, and the arrays stayed on 4 KiB pages)."""
    moved = memory.huge_page_array(np.ones(4 * memory.HUGE_PAGE // 4, np.float32))
    start = moved.ctypes.data
    mapping, huge = None, 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5:  # a mapping's first line: address range, perms, offset, dev, inode
            low, high = (int(a, 16) for a in head[0].split("-"))
            mapping = (low <= start < high, head[1])
        elif mapping and mapping[0] and head[0] == "AnonHugePages:":
            huge = int(head[1])
            break
    assert mapping is not None and mapping[0] and mapping[1].endswith("p"), mapping  # private, not shared
    assert huge > 0


def test_a_copied_sparse_linear_keeps_one_copy_of_its_arrays():
    import copy

    import torch
    from torch import nn

    from magprune.deploy import SparseLinear

    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight.mul_(torch.rand_like(linear.weight) < 0.2)
    copied = copy.deepcopy(SparseLinear(linear))
    # the module's buffers and the compiled product share one copy of the arrays
    assert copied.cols.data_ptr() == copied.product.cols.ctypes.data
    assert copied.vals.data_ptr() == copied.product.vals.ctypes.data
    x = torch.randn(3, 64)
    with torch.inference_mode():
        torch.testing.assert_close(copied(x), linear(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 64, 1001, 40_003])
def test_bit_mask_fill_sets_exactly_the_dropped_entries(monkeypatch, threads, n):
    monkeypatch.setattr(bitmask, "PARALLEL_MIN_MASKED", 0)  # the pool's chunks, tails included, on small tensors
    rng = np.random.default_rng(n)
    keep = rng.random(n) < 0.3
    packed = bitmask.BitMask(keep)
    assert packed.bits.nbytes == -(-n // 8)
    for value, pattern in ((0.0, 0), (1.0, 0x3F800000)):
        t = rng.standard_normal(n).astype(np.float32)
        expected = np.where(keep, t, np.float32(value))
        packed.fill(t.ctypes.data, pattern, threads)
        assert np.array_equal(t, expected)
    t = np.full(n, np.nan, dtype=np.float32)  # a multiply would keep NaN at pruned positions; the fill does not
    packed.fill(t.ctypes.data, 0, threads)
    assert np.array_equal(np.isnan(t), keep) and not t[~keep].any()


def test_a_copied_bit_mask_keeps_its_bits_and_plans_anew(monkeypatch):
    monkeypatch.setattr(bitmask, "PARALLEL_MIN_MASKED", 0)
    keep = np.random.default_rng(0).random(1000) < 0.5
    original = bitmask.BitMask(keep)
    ones = np.ones(1000, dtype=np.float32)
    original.fill(ones.ctypes.data, 0, 2)  # caches a plan with the original's addresses
    for copied in (copy.deepcopy(original), pickle.loads(pickle.dumps(original))):
        assert not copied._plans and np.array_equal(copied.bits, original.bits)
        t = np.ones(1000, dtype=np.float32)
        copied.fill(t.ctypes.data, 0, 2)
        assert np.array_equal(t, keep.astype(np.float32))


@pytest.mark.parametrize("lanes", [8, 16])  # AVX2 and AVX-512 builds: LLVM splits 16-lane vectors on an AVX2 host
@pytest.mark.parametrize("m", [8, 24, 40, 64, 136])
def test_products_of_both_vector_widths_match_dense(lanes, m):
    rng = np.random.default_rng(m)
    weight = (rng.standard_normal((50, 300)) * (rng.random((50, 300)) < 0.2)).astype(np.float32)
    weight[7] = 0.0  # an empty row
    indptr = np.concatenate([[0], np.cumsum((weight != 0).sum(axis=1))]).astype(np.int32)
    product = CSRProduct(indptr, np.nonzero(weight)[1].astype(np.uint16), weight[weight != 0], 300, tile_rows=64,
                         lanes=lanes)
    x = rng.standard_normal((2, 300, m)).astype(np.float32)
    out = np.ones((2, 50, m), np.float32)
    product.matmul(x, out, 2, widest=64)
    assert _close(out, weight @ x + 1.0)


@pytest.mark.parametrize("lanes", [8, 16])
@pytest.mark.parametrize("m", [16, 64, 136])
def test_row_major_products_walk_l1_sized_tiles_on_avx512_and_match_dense(lanes, m, monkeypatch):
    # sparse compute's layout (values row-major, stepped in place): on AVX-512 the batched products walk the input
    # in the tile-major layout's small tiles through per-tile row pointers (where the input block is large: here
    # always); AVX2 and a caller's tiles keep theirs
    monkeypatch.setattr(csr, "L1_TILES_MIN_FRACTION", 0.0)
    rng = np.random.default_rng(m + lanes)
    weight = (rng.standard_normal((70, 1000)) * (rng.random((70, 1000)) < 0.08)).astype(np.float32)
    weight[3], weight[:, 500:700] = 0.0, 0.0  # an empty row and two empty tiles
    indptr = np.concatenate([[0], np.cumsum((weight != 0).sum(axis=1))]).astype(np.int32)
    args = (indptr, np.nonzero(weight)[1].astype(np.uint16), weight[weight != 0], 1000)
    product = CSRProduct(*args, lanes=lanes, tile_major=False)
    width = min(m, 64)
    tiles = product._row_major_tiles(width)
    expected_tiles = -(-1000 // csr.major_tile_rows(width)) if lanes == 16 else product.tiles.shape[0] - 1
    assert tiles.shape == (expected_tiles + 1, 70)
    assert CSRProduct(*args, tile_rows=2048, lanes=lanes, tile_major=False)._row_major_tiles(width).shape[0] == 2
    x = rng.standard_normal((2, 1000, m)).astype(np.float32)
    for p in (product, pickle.loads(pickle.dumps(product))):
        out = np.ones((2, 70, m), np.float32)
        p.matmul(x, out, 2, widest=64)
        assert _close(out, weight @ x + 1.0)
    values = weight[weight != 0] * 2.0  # the optimizer's storage, updated in place
    product.rebind_values(values)
    out = np.zeros((2, 70, m), np.float32)
    product.matmul(x, out, 1, widest=64)
    assert _close(out, 2.0 * weight @ x)


def test_l1_tiles_only_where_the_input_block_is_large():
    # one chunk's input block within a quarter of L2 (LeNet-300-100's fc1 at batch 64: 200 KiB): the product's own
    # L2-sized tiles, one run per row; larger blocks (GPT-2's 3072 inputs, AlexNet's 9216): the L1 tiles, on AVX-512
    n_in = csr.l2_cache_bytes() // 512  # 64-float rows: twice a quarter of L2
    small, large = [CSRProduct(np.array([0, 1], np.int32), np.array([3], np.uint16), np.ones(1, np.float32), n,
                               lanes=16, tile_major=False) for n in (1000, n_in)]
    assert small._row_major_tiles(64) is small.tiles
    assert large._row_major_tiles(64).shape[0] - 1 == -(-n_in // csr.major_tile_rows(64))


@pytest.mark.parametrize("lanes", [8, 16])
@pytest.mark.parametrize("m", [8, 40, 64, 136])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tile_major", [False, True])
def test_overwriting_products_write_every_row_whatever_out_held(parallel_always, lanes, m, threads, tile_major):
    # sparse compute's Linear layers write their products into fresh (uninitialised) memory: the first input tile's
    # calls write each row, empty rows and rows empty in the first tile included, the later tiles add
    rng = np.random.default_rng(m + lanes)
    weight = (rng.standard_normal((50, 300)) * (rng.random((50, 300)) < 0.2)).astype(np.float32)
    weight[7] = 0.0  # an empty row
    weight[11, :64] = 0.0  # a row with nothing in the first tile
    indptr = np.concatenate([[0], np.cumsum((weight != 0).sum(axis=1))]).astype(np.int32)
    args = (indptr, np.nonzero(weight)[1].astype(np.uint16), weight[weight != 0], 300)
    for product in (CSRProduct(*args, tile_rows=64, lanes=lanes, tile_major=tile_major),
                    CSRProduct(*args, lanes=lanes, tile_major=tile_major)):  # several tiles, and the default tiles
        x = rng.standard_normal((2, 300, m)).astype(np.float32)
        out = np.full((2, 50, m), np.nan, np.float32)
        product.matmul_plan(2, m, threads, 64, overwrite=True).run(x.ctypes.data, out.ctypes.data)
        assert _close(out, weight @ x)
        out = np.ones((2, 50, m), np.float32)  # the adding plan of the same shape is still its own
        product.matmul_plan(2, m, threads, 64).run(x.ctypes.data, out.ctypes.data)
        assert _close(out, weight @ x + 1.0)
    with pytest.raises(ValueError, match="only adds"):
        csr.kernel(1, np.uint16, lanes, overwrite=True)


@pytest.mark.parametrize("lanes", [8, 16])
@pytest.mark.parametrize("m", [8, 40, 64, 136])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tile_major", [False, True])
def test_bias_writing_products_write_every_row_plus_its_bias(parallel_always, lanes, m, threads, tile_major):
    # sparse compute's Linear layers write product plus bias in the first input tile's calls (spmmb_* kernels, the
    # bias read at each run): every row and column chunk gets its bias, empty rows and rows empty in the first tile
    # included, whatever the output held
    rng = np.random.default_rng(m + lanes + 1)
    weight = (rng.standard_normal((50, 300)) * (rng.random((50, 300)) < 0.2)).astype(np.float32)
    weight[7] = 0.0  # an empty row
    weight[11, :64] = 0.0  # a row with nothing in the first tile
    indptr = np.concatenate([[0], np.cumsum((weight != 0).sum(axis=1))]).astype(np.int32)
    args = (indptr, np.nonzero(weight)[1].astype(np.uint16), weight[weight != 0], 300)
    bias = rng.standard_normal(50).astype(np.float32)
    ld = m + 16  # rows of the output and input longer than the m columns that count
    for product in (CSRProduct(*args, tile_rows=64, lanes=lanes, tile_major=tile_major),
                    CSRProduct(*args, lanes=lanes, tile_major=tile_major)):  # several tiles, and the default tiles
        x = rng.standard_normal((300, ld)).astype(np.float32)
        out = np.full((50, ld), np.nan, np.float32)
        plan = product.matmul_plan(1, m, threads, 64, ld, overwrite=True, bias_address=bias.ctypes.data)
        plan.run(x.ctypes.data, out.ctypes.data)
        assert _close(out[:, :m], weight @ x[:, :m] + bias[:, None])
        assert np.isnan(out[:, m:]).all()  # nothing past the m columns written
        bias += 1.0  # stepped in place: the same plan reads the new values
        plan.run(x.ctypes.data, out.ctypes.data)
        assert _close(out[:, :m], weight @ x[:, :m] + bias[:, None])
    with pytest.raises(ValueError, match="one block"):
        product.matmul_plan(2, m, threads, 64, overwrite=True, bias_address=bias.ctypes.data)
    with pytest.raises(ValueError, match="one block"):
        product.matmul_plan(1, m, threads, 64, bias_address=bias.ctypes.data)
    with pytest.raises(ValueError, match="overwrite=True"):
        csr.kernel(64, np.uint16, lanes, bias=True)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_plan_gathers_its_values_before_its_products(parallel_always, threads):
    # sparse compute's input-gradient product takes W^T's values from the weight's at each run (each task its own
    # rows' values, then their products): values changed in place between runs are followed
    rng = np.random.default_rng(threads)
    weight_t = (rng.standard_normal((60, 40)) * (rng.random((60, 40)) < 0.3)).astype(np.float32)
    weight_t[9] = 0.0  # an empty row
    indptr = np.concatenate([[0], np.cumsum((weight_t != 0).sum(axis=1))]).astype(np.int32)
    nnz = int(indptr[-1])
    perm = rng.permutation(nnz).astype(np.int64)
    source = np.empty(nnz, np.float32)
    source[perm] = weight_t[weight_t != 0]  # vals[k] = source[perm[k]] restores W^T's row-major values
    product = CSRProduct(indptr, np.nonzero(weight_t)[1].astype(np.uint8), np.full(nnz, np.nan, np.float32), 40,
                         tile_rows=16, tile_major=False)
    x = rng.standard_normal((40, 16)).astype(np.float32)
    plan = product.matmul_plan(1, 16, threads, 64, overwrite=True, gather=(source.ctypes.data, perm.ctypes.data))
    for scale in (1.0, 3.0):
        source[:] = weight_t[weight_t != 0][np.argsort(perm)] * scale  # in place, as an optimizer steps the weight
        out = np.full((60, 16), np.nan, np.float32)
        plan.run(x.ctypes.data, out.ctypes.data)
        assert _close(out, (weight_t * scale) @ x)
    with pytest.raises(ValueError, match="row-major"):
        CSRProduct(indptr, np.nonzero(weight_t)[1].astype(np.uint8), weight_t[weight_t != 0], 40,
                   tile_major=True).matmul_plan(1, 16, threads, 64, gather=(source.ctypes.data, perm.ctypes.data))


@pytest.mark.parametrize("lanes", [8, 16])  # the scalar-load (AVX2) and the gather (AVX-512) batch-1 kernels
@pytest.mark.parametrize("index", [np.uint8, np.uint16, np.uint32])
@pytest.mark.parametrize("threads", [1, 2])
def test_matvec_kernels_of_both_builds_match_dense_for_every_row_length(parallel_always, lanes, index, threads):
    # rows of 0..40 nonzeros and two long ones: empty rows, rows shorter than one gather, the masked tail at each
    # length, and the vector loop's end exactly at a row's end
    n_in = 200 if index == np.uint8 else 700
    lengths = [*range(41), 160, n_in]
    rng = np.random.default_rng(len(lengths) + n_in)
    weight = np.zeros((len(lengths), n_in), np.float32)
    for row, length in enumerate(lengths):
        weight[row, rng.choice(n_in, size=length, replace=False)] = rng.standard_normal(length)
    indptr = np.concatenate([[0], np.cumsum((weight != 0).sum(axis=1))]).astype(np.int32)
    product = CSRProduct(indptr, np.nonzero(weight)[1].astype(index), weight[weight != 0], n_in, lanes=lanes)
    x = rng.standard_normal(n_in).astype(np.float32)
    out = np.full(len(lengths), 0.5, np.float32)
    product.matvec(x, out, threads)
    np.testing.assert_allclose(out, weight.astype(np.float64) @ x + 0.5, rtol=1e-5, atol=1e-5)
    bias = rng.standard_normal(len(lengths)).astype(np.float32)  # rows start from the bias: out is not read
    out = np.full(len(lengths), np.nan, np.float32)
    product.matvec_at(x.ctypes.data, out, threads, bias.ctypes.data)
    np.testing.assert_allclose(out, weight.astype(np.float64) @ x + bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_delta_column_matvec_matches_dense_and_falls_back_past_a_gap_of_255(parallel_always, threads):
    """AVX-512's batch-1 product over 1-byte column gaps: rows of every length up to 40 and long ones, gaps of 1 to
    exactly 255, a first column past 255 (the row's own start), empty rows; a gap of 256 keeps absolute columns."""
    n_in = 2000
    rng = np.random.default_rng(7)
    weight = np.zeros((48, n_in), np.float32)
    for row, length in enumerate([*range(41), 300, 600]):
        weight[row, 1000 + np.sort(rng.choice(250, size=min(length, 250), replace=False))] = 1.0
        if length > 250:  # a long row: columns 255 apart and every column of a stretch
            weight[row, np.arange(0, n_in, 255)] = 1.0
            weight[row, 300:300 + length] = 1.0
    weight[45, [3, 258, 513]] = 1.0  # gaps of exactly 255
    weight[46, n_in - 1] = 1.0  # one nonzero, far from column 0
    weight *= rng.standard_normal(weight.shape).astype(np.float32)
    indptr = np.concatenate([[0], np.cumsum((weight != 0).sum(axis=1))]).astype(np.int32)
    cols = np.nonzero(weight)[1]
    x = rng.standard_normal(n_in).astype(np.float32)
    expected = weight.astype(np.float64) @ x + 0.5
    product = CSRProduct(indptr, cols.astype(np.uint16), weight[weight != 0], n_in, lanes=16)
    assert product.delta_form() is not None and product.delta_form()[1].max() == 255
    out = np.full(48, 0.5, np.float32)
    product.matvec(x, out, threads)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    bias = np.full(48, 0.5, np.float32)  # rows start from the bias: out is not read
    out = np.full(48, np.nan, np.float32)
    product.matvec_at(x.ctypes.data, out, threads, bias.ctypes.data)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    product.rebind_values(weight[weight != 0] * 2.0)  # values stepped elsewhere: read from there
    out = np.full(48, 0.5, np.float32)
    product.matvec(x, out, threads)
    np.testing.assert_allclose(out, 2.0 * (expected - 0.5) + 0.5, rtol=1e-5, atol=1e-5)
    weight[45, 513], weight[45, 514] = 0.0, 1.0  # a gap of 256
    indptr = np.concatenate([[0], np.cumsum((weight != 0).sum(axis=1))]).astype(np.int32)
    wide = CSRProduct(indptr, np.nonzero(weight)[1].astype(np.uint16), weight[weight != 0], n_in, lanes=16)
    assert wide.delta_form() is None
    out = np.full(48, 0.5, np.float32)
    wide.matvec(x, out, threads)
    np.testing.assert_allclose(out, weight.astype(np.float64) @ x + 0.5, rtol=1e-5, atol=1e-5)
    assert CSRProduct(indptr, np.nonzero(weight)[1].astype(np.uint16), weight[weight != 0], n_in,
                      lanes=8).delta_form() is None  # AVX2: absolute columns


_ADD_IR = "define i64 @add3(i64 %a) {\n  %b = add i64 %a, 3\n  ret i64 %b\n}"


def _add3(engine) -> int:
    import ctypes

    return ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)(engine.get_function_address("add3"))(39)


def test_compiled_kernels_are_cached_checked_and_replaced_when_damaged(tmp_path, monkeypatch):
    import llvmlite.binding as llvm

    from magprune.kernels import jit

    monkeypatch.setenv(jit.CACHE_ENV, str(tmp_path / "kernels"))
    assert _add3(jit._jit(_ADD_IR)) == 42
    (stored,) = (tmp_path / "kernels").glob("*.o")
    optimized = []
    real = llvm.create_pass_builder
    monkeypatch.setattr(llvm, "create_pass_builder", lambda *a: optimized.append(1) or real(*a))
    assert _add3(jit._jit(_ADD_IR)) == 42 and not optimized  # loaded, not compiled
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF  # a damaged object: its digest fails, so it is compiled again and replaced
    stored.write_bytes(bytes(data))
    assert _add3(jit._jit(_ADD_IR)) == 42 and optimized == [1]
    assert jit._read_cached(stored) is not None
    assert _add3(jit._jit(_ADD_IR.replace("3", "5").replace("add5", "add3"))) == 44  # other IR, other entry
    assert len(list((tmp_path / "kernels").glob("*.o"))) == 2
    monkeypatch.setenv(jit.CACHE_ENV, "off")
    assert jit.cache_dir() is None and _add3(jit._jit(_ADD_IR)) == 42
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(jit.CACHE_ENV, str(tmp_path / "a-file" / "kernels"))  # cannot be created: no cache, no error
    assert _add3(jit._jit(_ADD_IR)) == 42
    assert not list(tmp_path.glob("**/.*.tmp"))
    monkeypatch.delenv(jit.CACHE_ENV)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(jit.Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))
    assert jit.cache_dir() is None and _add3(jit._jit(_ADD_IR)) == 42  # no home directory: no cache, no error


def test_kernels_are_built_for_the_hosts_vector_width():
    import llvmlite.binding as llvm

    from magprune.kernels.jit import vector_lanes

    assert vector_lanes() == (16 if llvm.get_host_cpu_features().get("avx512f", False) else 8)
    assert csr.block_width() == 4 * vector_lanes()
    assert csr.default_tile_rows() == max(memory.l2_cache_bytes() // (8 * csr.block_width()), 256)
    with pytest.raises(ValueError, match="lanes must be 8"):
        csr.kernel(8, np.uint16, lanes=4)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1, 8, 8), (2, 13, 21), (3, 64, 200), (1, 300, 37), (4, 7, 5), (1, 1, 9),
                                   (2, 40, 16)])
def test_transpose_matches_numpy_for_ragged_and_batched_shapes(monkeypatch, threads, shape):
    monkeypatch.setattr(transpose, "PARALLEL_MIN_FLOATS", 0)
    src = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    dst = np.full((shape[0], shape[2], shape[1]), np.nan, np.float32)
    assert transpose.transpose(src, dst, threads) is dst
    assert np.array_equal(dst, src.transpose(0, 2, 1))


def test_transpose_reads_and_writes_strided_views_only_inside_them():
    big = np.random.default_rng(0).standard_normal((2, 20, 40)).astype(np.float32)
    dst = np.zeros((2, 48, 24), np.float32)
    transpose.transpose(big[:, 2:18, 3:35], dst[:, 4:36, 1:17], 2)
    assert np.array_equal(dst[:, 4:36, 1:17], big[:, 2:18, 3:35].transpose(0, 2, 1))
    dst[:, 4:36, 1:17] = 0.0
    assert not dst.any()  # nothing written outside the view


def test_transpose_refuses_what_it_cannot_write():
    src = np.zeros((1, 8, 16), np.float32)
    with pytest.raises(ValueError, match="must have shape"):
        transpose.transpose(src, np.zeros((1, 8, 16), np.float32))
    with pytest.raises(ValueError, match="float32"):
        transpose.transpose(src.astype(np.float64), np.zeros((1, 16, 8)))
    with pytest.raises(ValueError, match="unit-stride rows"):
        transpose.transpose(np.zeros((1, 16, 8), np.float32).transpose(0, 2, 1), np.zeros((1, 16, 8), np.float32))
    read_only = np.zeros((1, 16, 8), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        transpose.transpose(src, read_only)
