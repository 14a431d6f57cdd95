"""Sparse compute for retraining: the SDDMM kernel, the transposed product, and sparse_compute against masked-dense
training (dense autograd with the mask applied)."""

import copy

import numpy as np
import pytest
import torch
from gloo_workers import finished, spawn
from torch import nn

import magprune
from magprune import sparse_training
from magprune.kernels import sddmm
from magprune.kernels.sddmm import SampledProduct
from magprune.sparse_training import _Structure


@pytest.fixture(autouse=True)
def _every_size(monkeypatch):
    """Small layers are computed sparse too here (by default they stay dense: see the test below)."""
    monkeypatch.setattr(sparse_training, "MIN_WEIGHTS", 0)


def test_small_layers_stay_dense_by_default(monkeypatch):
    monkeypatch.undo()
    model, pruner = _pruned()
    assert magprune.sparse_compute(model, pruner).names == ["fc1.weight", "fc2.weight", "fc3.weight"]  # fc3: 1,000
    pruner.compute_handles[0].remove()
    torch.manual_seed(0)
    tiny = nn.Sequential(nn.Linear(784, 40), nn.ReLU(), nn.Linear(40, 10))  # 400 weights: under MIN_WEIGHTS
    tiny_pruner = magprune.Pruner(tiny)
    tiny_pruner.prune(magprune.LayerSparsity({"0.weight": 0.9, "2.weight": 0.7}))
    assert magprune.sparse_compute(tiny, tiny_pruner).names == ["0.weight"]
    tiny_pruner.compute_handles[0].remove()
    assert magprune.sparse_compute(tiny, tiny_pruner, min_weights=0).names == ["0.weight", "2.weight"]


def _pattern(rows: int, n_in: int, density: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = rng.random((rows, n_in)) < density
    keep[rows // 3] = False  # an empty row
    keep[:, n_in // 2] = False  # an empty column
    if rows > 4:
        keep[1, :] = rng.random(n_in) < 0.9  # a long (ragged) row
    return keep


@pytest.mark.parametrize("m", [8, 16, 24, 64, 256])
@pytest.mark.parametrize("lanes", sddmm.LANES)
@pytest.mark.parametrize("n_in", [7, 300, 70000])  # uint8, uint16 and uint32 column indices
def test_sddmm_matches_dense_product_at_kept_positions(m, lanes, n_in, monkeypatch):
    monkeypatch.setattr(sddmm, "PARALLEL_MIN_WORK", 0)
    if lanes == 16:  # the 16-lane kernel runs (emulated by LLVM where the host has no AVX-512) when m allows it
        monkeypatch.setattr(sddmm, "vector_lanes", lambda: 16)
    keep = _pattern(13, n_in, 0.3 if n_in < 1000 else 0.002, m)
    keep[2, :] = False
    keep[2, :9] = True  # a row of 9 nonzeros: one group of eight and one left over
    indptr = np.concatenate([[0], np.cumsum(keep.sum(1))]).astype(np.int32)
    cols = np.nonzero(keep)[1].astype(np.uint8 if n_in <= 256 else np.uint16 if n_in <= 65536 else np.uint32)
    product = SampledProduct(indptr, cols, n_in)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, n_in, m)).astype(np.float32)
    dy = rng.standard_normal((3, 13, m)).astype(np.float32)
    rows, columns = np.nonzero(keep)
    out = np.full(product.nnz, np.nan, np.float32)
    product.run(x[0], dy[0], out, 2)  # one block
    exact = (dy[0].astype(np.float64) @ x[0].astype(np.float64).T)[rows, columns]
    np.testing.assert_allclose(out, exact, rtol=1e-4, atol=1e-4)
    product.run(x, dy, out, 2)  # three blocks, summed
    exact = np.einsum("bow,biw->oi", dy.astype(np.float64), x.astype(np.float64))[rows, columns]
    np.testing.assert_allclose(out, exact, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("products", [True, False])
def test_sddmm_plan_writes_row_sums_after_the_products_in_one_buffer(threads, products, monkeypatch):
    # a Linear layer's bias gradient (dy's row sums) is written by the weight gradient's tasks, after the nnz products
    # in the same buffer (or alone: a frozen weight, a trained bias); every row, empty ones included, once
    monkeypatch.setattr(sddmm, "PARALLEL_MIN_WORK", 0)
    keep = _pattern(40, 30, 0.3, threads)
    keep[5] = False  # an empty row
    indptr = np.concatenate([[0], np.cumsum(keep.sum(1))]).astype(np.int32)
    product = SampledProduct(indptr, np.nonzero(keep)[1].astype(np.uint8), 30)
    rng = np.random.default_rng(threads)
    m, ld = 24, 40  # rows longer than the m columns that count: those must not be summed
    x, dy = rng.standard_normal((30, ld)).astype(np.float32), rng.standard_normal((40, ld)).astype(np.float32)
    offset = product.nnz if products else 0
    out = np.full(offset + 40, np.nan, np.float32)
    product.plan(m, threads, ld, products=products, row_sums=offset).run(x.ctypes.data, out.ctypes.data,
                                                                         dy.ctypes.data)
    np.testing.assert_allclose(out[offset:], dy[:, :m].astype(np.float64).sum(1), rtol=1e-5, atol=1e-5)
    if products:
        rows, columns = np.nonzero(keep)
        exact = (dy[:, :m].astype(np.float64) @ x[:, :m].astype(np.float64).T)[rows, columns]
        np.testing.assert_allclose(out[:offset], exact, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="one block"):
        product.plan(m, threads, blocks=2, row_sums=0)
    with pytest.raises(ValueError, match="does nothing"):
        product.plan(m, threads, products=False)


def test_sddmm_rejects_wrong_shapes():
    product = SampledProduct(np.array([0, 1], np.int32), np.array([0], np.uint8), 4)
    with pytest.raises(ValueError, match="SampledProduct.run wants"):
        product.run(np.zeros((4, 12), np.float32), np.zeros((1, 12), np.float32), np.zeros(1, np.float32), 1)
    with pytest.raises(ValueError, match="SampledProduct.run wants"):
        product.run(np.zeros((4, 16), np.float32), np.zeros((2, 16), np.float32), np.zeros(1, np.float32), 1)


def _masked_linear(n_in: int, n_out: int, keep: np.ndarray, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(torch.from_numpy(keep).float())
    return layer


@pytest.mark.parametrize("batch", [1, 2, 7, 32, 33, 64, 100, 256])
def test_sparse_linear_forward_and_both_gradients_match_masked_dense_autograd(batch):
    torch.manual_seed(batch)
    keep = _pattern(37, 45, 0.2, batch)
    dense = _masked_linear(45, 37, keep)
    pruner = magprune.Pruner(dense, ["weight"])
    mask = torch.from_numpy(keep)
    pruner.prune(lambda weights, masks: {"weight": mask.clone()})
    sparse = _masked_linear(45, 37, keep)
    sparse.load_state_dict(dense.state_dict())
    sparse_pruner = magprune.Pruner(sparse, ["weight"])
    sparse_pruner.prune(lambda weights, masks: {"weight": mask.clone()})
    handle = magprune.sparse_compute(sparse, sparse_pruner)
    x1 = torch.randn(batch, 45, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = dense(x1), sparse(x2)
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.weight_values.grad, dense.weight.grad.reshape(-1)[mask.reshape(-1)],
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sparse.bias.grad, dense.bias.grad)
    handle.remove()
    torch.testing.assert_close(sparse.weight.grad, dense.weight.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [7, 64])  # 64: the data batch transposed by the layer's cached plan
@pytest.mark.parametrize("trained", ["both", "weight", "bias"])
def test_gradients_with_a_frozen_weight_or_bias_match_masked_dense(batch, trained):
    # the weight and bias gradients come from one plan into one buffer: either alone must still be right, and a
    # frozen parameter gets none
    torch.manual_seed(batch)
    keep = _pattern(40, 48, 0.2, batch)
    keep[3] = False  # a row with nothing kept: its bias gradient still counts
    dense = _masked_linear(48, 40, keep)
    sparse = _masked_linear(48, 40, keep)
    sparse.load_state_dict(dense.state_dict())
    mask = torch.from_numpy(keep)
    for layer in (dense, sparse):
        layer.weight.requires_grad_(trained != "bias")
        layer.bias.requires_grad_(trained != "weight")
    pruner = magprune.Pruner(sparse, ["weight"])
    pruner.prune(lambda weights, masks: {"weight": mask.clone()})
    magprune.sparse_compute(sparse, pruner)
    x1 = torch.randn(batch, 48, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    g = torch.randn(batch, 40)
    dense(x1).backward(g)
    sparse(x2).backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)
    if trained == "bias":
        assert sparse.weight_values.grad is None
    else:
        torch.testing.assert_close(sparse.weight_values.grad, dense.weight.grad.reshape(-1)[mask.reshape(-1)],
                                   rtol=1e-4, atol=1e-4)
    if trained == "weight":
        assert sparse.bias.grad is None
    else:
        torch.testing.assert_close(sparse.bias.grad, dense.bias.grad, rtol=1e-5, atol=1e-5)


def test_input_gradient_reads_the_weight_where_it_is_at_backward():
    # W^T's values are gathered from the weight's storage by the input-gradient plan; storage replaced between the
    # forward and the backward (``.data =``, which autograd's version check does not see) is read where it is now,
    # as dense autograd reads it
    torch.manual_seed(0)
    keep = _pattern(30, 40, 0.3, 0)
    sparse = _masked_linear(40, 30, keep)
    pruner = magprune.Pruner(sparse, ["weight"])
    mask = torch.from_numpy(keep)
    pruner.prune(lambda weights, masks: {"weight": mask.clone()})
    magprune.sparse_compute(sparse, pruner)
    x = torch.randn(16, 40, requires_grad=True)
    g = torch.randn(16, 30)
    y = sparse(x)
    sparse.weight_values.data = sparse.weight_values.data * 2.0  # new storage, values doubled
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ sparse.weight.detach(), rtol=1e-5, atol=1e-5)
    x.grad = None
    sparse(x).backward(g)  # the next forward rebinds the plans to the new storage
    torch.testing.assert_close(x.grad, g @ sparse.weight.detach(), rtol=1e-5, atol=1e-5)


def test_transposed_structure_covers_every_nonzero_once():
    keep = _pattern(20, 30, 0.3, 0)
    values = np.arange(keep.sum(), dtype=np.float32)
    structure = _Structure(keep, values)
    dense = np.zeros(keep.shape, np.float32)
    dense[keep] = values
    x = np.random.default_rng(0).standard_normal((1, 20, 8)).astype(np.float32)
    out = np.zeros((1, 30, 8), np.float32)
    structure.values_t[:] = torch.from_numpy(values)[structure.perm]
    structure.product_t.matmul(x, out, 1)
    np.testing.assert_allclose(out[0], dense.T @ x[0], rtol=1e-5, atol=1e-4)


def _pruned(seed: int = 0) -> tuple[nn.Module, magprune.Pruner]:
    torch.manual_seed(seed)
    model = magprune.create_model("lenet-300-100")
    pruner = magprune.Pruner(model)
    pruner.prune(magprune.han2015("lenet-300-100"))
    return model, pruner


def _small(seed: int = 0) -> tuple[nn.Module, magprune.Pruner]:
    # tanh, not ReLU: a pre-activation within rounding of zero flips a ReLU in one run and not the other, a jump
    # that no float tolerance covers (seen at step ~15 of 100); a smooth activation keeps the runs within rounding
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 10))
    pruner = magprune.Pruner(model)
    pruner.prune(magprune.LayerSparsity({"0.weight": 0.9, "2.weight": 0.85, "4.weight": 0.7}))
    return model, pruner


def _train(model, optimizer, steps: int, seed: int = 1, clip: float | None = None, accumulate: int = 1):
    generator = torch.Generator().manual_seed(seed)
    n_in = next(m for m in model.modules() if isinstance(m, nn.Linear)).in_features
    for _ in range(steps):
        optimizer.zero_grad()
        for _ in range(accumulate):
            x, y = torch.randn(16, n_in, generator=generator), torch.randint(0, 10, (16,), generator=generator)
            nn.functional.cross_entropy(model(x), y).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4),
    lambda params: torch.optim.Adam(params, lr=1e-3),
], ids=["sgd-momentum", "adam"])
def test_100_steps_equal_masked_dense_training(make_optimizer):
    reference, reference_pruner = _small()
    reference_opt = make_optimizer(reference.parameters())
    reference_pruner.attach(reference_opt)
    model, pruner = _small()
    handle = magprune.sparse_compute(model, pruner, max_density=1.0)
    assert len(handle.names) == 3
    optimizer = make_optimizer(model.parameters())
    pruner.attach(optimizer)
    _train(reference, reference_opt, 100)
    _train(model, optimizer, 100)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs) and all(ours[k].shape == theirs[k].shape for k in ours)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=2e-5)
    pruner.check()
    handle.remove()
    pruner.check(optimizer)
    for name, mask in pruner.masks.items():
        assert not pruner.params[name][~mask].any()


def test_optimizer_made_before_is_switched_with_its_state_and_back():
    model, pruner = _pruned()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    pruner.attach(optimizer)
    _train(model, optimizer, 3)
    reference, reference_pruner = _pruned()
    reference.load_state_dict(model.state_dict())
    reference_opt = torch.optim.Adam(reference.parameters(), lr=1e-3)
    reference_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # else both share state tensors
    reference_pruner.attach(reference_opt)
    handle = magprune.sparse_compute(model, pruner)
    assert model.fc1.weight_values in optimizer.state
    _train(model, optimizer, 5, seed=2)
    _train(reference, reference_opt, 5, seed=2)
    handle.remove()
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)
    state = optimizer.state[model.fc1.weight]
    assert state["exp_avg"].shape == model.fc1.weight.shape
    pruner.check(optimizer)
    _train(model, optimizer, 1)  # dense again, hooked as before
    pruner.check(optimizer)


class _ReadsTheWeight(nn.Module):
    """Code that reads a layer's weight instead of calling the layer (a weight tied by hand, custom attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 48), nn.Linear(48, 10)

    def forward(self, x):
        h = torch.tanh(self.fc1(x)) + torch.tanh(nn.functional.linear(x, self.fc1.weight))
        return nn.functional.linear(h, self.fc2.weight, self.fc2.bias)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(48, 128)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.tanh(self.embed(x)).view(x.shape[0], 4, 32)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


@pytest.mark.parametrize("make", [_ReadsTheWeight, _Attention], ids=["weight-read-directly", "multihead-attention"])
def test_a_weight_read_as_a_tensor_still_trains(make):
    """Before: ``weight`` read a detached copy, so a layer used that way got no gradient and silently never trained
    (nn.MultiheadAttention's out_proj, which F.multi_head_attention_forward reads as a tensor)."""
    runs = []
    for sparse in (False, True):
        torch.manual_seed(0)
        model = make()
        pruner = magprune.Pruner(model)
        pruner.prune(magprune.LayerSparsity(0.9))
        handle = magprune.sparse_compute(model, pruner) if sparse else None
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        pruner.attach(optimizer)
        _train(model, optimizer, 20)
        if handle is not None:
            assert "attn.out_proj.weight" not in handle.names  # never called: it stays masked dense
            handle.remove()
        pruner.check(optimizer)
        runs.append(model.state_dict())
    dense, sparse = runs
    torch.manual_seed(0)
    start = make().state_dict()  # every weight must have moved, else equal runs prove nothing
    for key in dense:
        assert not torch.equal(dense[key], start[key]), key
        torch.testing.assert_close(sparse[key], dense[key], rtol=1e-4, atol=2e-5)


def test_multihead_attention_out_proj_named_is_refused():
    model = _Attention()
    pruner = magprune.Pruner(model)
    pruner.prune(magprune.LayerSparsity(0.9))
    with pytest.raises(ValueError, match="out_proj weight as a tensor"):
        magprune.sparse_compute(model, pruner, layers=["attn.out_proj.weight"])


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.body = nn.Embedding(100, 32), nn.Linear(32, 64)
        self.head = nn.Linear(32, 100, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1) + torch.tanh(self.body(self.emb(ids)))[..., :32].mean(1))


def test_a_tied_weight_stays_masked_dense_and_tied():
    """Before: the tied head computed sparse from its own compact copy while the embedding kept the dense
    parameter, each stepped apart by the optimizer: the tie was broken silently."""
    torch.manual_seed(0)
    model = _Tied()
    pruner = magprune.Pruner(model, ["head", "body"])
    pruner.prune(magprune.LayerSparsity(0.9))
    handle = magprune.sparse_compute(model, pruner)
    assert handle.names == ["body.weight"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner.attach(optimizer)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        optimizer.zero_grad()
        ids = torch.randint(0, 100, (8, 5), generator=generator)
        nn.functional.cross_entropy(model(ids), torch.randint(0, 100, (8,), generator=generator)).backward()
        optimizer.step()
    assert model.head.weight is model.emb.weight
    pruner.check(optimizer)
    handle.remove()
    with pytest.raises(ValueError, match=r"head.weight is tied \(emb.weight, head.weight\)"):
        magprune.sparse_compute(model, pruner, layers=["head.weight"])
    only_head = magprune.Pruner(_Tied(), ["head"])
    only_head.prune(magprune.LayerSparsity(0.9))
    with pytest.raises(ValueError, match="among.*head.weight is tied"):  # the only candidate: the error says why
        magprune.sparse_compute(only_head.model, only_head)


def test_autocast_computes_the_sparse_layers_in_float32():
    model, pruner = _small()
    reference = copy.deepcopy(model)  # masked dense, float32
    magprune.sparse_compute(model, pruner, max_density=1.0)  # every layer sparse: the whole model stays float32
    x = torch.randn(16, 64)
    for given in (x, x.bfloat16()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(given)
        assert out.dtype == torch.float32
        want = reference(given.float())
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        out.square().sum().backward()
        want.square().sum().backward()
        grad = reference[0].weight.grad.reshape(-1)[model[0]._magprune_sparse.structure.positions_t]
        torch.testing.assert_close(model[0].weight_values.grad, grad, rtol=1e-4, atol=1e-5)
        model.zero_grad()
        reference.zero_grad()
    with pytest.raises(TypeError, match="float32 CPU tensors"):  # without autocast a bf16 input is an error
        model(x.bfloat16())


@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64), (0, 1, 12, 12)], ids=["linear", "linear-3d", "conv"])
def test_an_empty_batch_gives_zero_gradients_like_dense(shape):
    """Before: an empty batch returned zeros plus the bias, so the input and the compact weight got no gradient at
    all (None: under DDP a rank with an empty batch would then hold no gradient to all-reduce)."""
    torch.manual_seed(0)
    conv = len(shape) == 4
    model = nn.Sequential(nn.Conv2d(1, 20, 5) if conv else nn.Linear(64, 48))
    pruner = magprune.Pruner(model)
    pruner.prune(magprune.LayerSparsity(0.9))
    magprune.sparse_compute(model, pruner)
    x = torch.zeros(shape, requires_grad=True)
    out = model(x)
    assert out.shape == ((0, 20, 8, 8) if conv else (*shape[:-1], 48))
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    values = model[0].weight_values
    assert values.grad is not None and values.grad.shape == values.shape and not values.grad.any()
    assert model[0].bias.grad is not None and not model[0].bias.grad.any()


def test_a_weight_read_under_no_grad_is_a_plain_copy():
    model, pruner = _pruned()
    magprune.sparse_compute(model, pruner)
    assert model.fc1.weight.grad_fn is not None  # grad mode: a function of weight_values
    with torch.no_grad():
        weight = model.fc1.weight
    assert weight.grad_fn is None and not weight.requires_grad
    torch.testing.assert_close(weight, model.fc1.weight.detach())


def test_clipping_and_accumulation_match_masked_dense():
    reference, reference_pruner = _pruned()
    reference_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    reference_pruner.attach(reference_opt)
    model, pruner = _pruned()
    magprune.sparse_compute(model, pruner)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(reference, reference_opt, 10, clip=0.5, accumulate=3)
    _train(model, optimizer, 10, clip=0.5, accumulate=3)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-4, atol=2e-5)


def test_state_dict_is_plain_and_loads_both_ways():
    model, pruner = _pruned()
    magprune.sparse_compute(model, pruner)
    state = model.state_dict()
    plain = magprune.create_model("lenet-300-100")
    plain.load_state_dict(state, strict=True)
    assert torch.equal(plain.fc1.weight, model.fc1.weight)
    assert model.fc1.weight.shape == (300, 784) and not model.fc1.weight[~pruner.masks["fc1.weight"]].any()
    with torch.no_grad():
        plain.fc1.weight.mul_(2)
    model.load_state_dict(plain.state_dict(), strict=True)
    torch.testing.assert_close(model.fc1.weight, plain.fc1.weight * pruner.masks["fc1.weight"])
    x = torch.randn(5, 784)
    torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)


def test_deeper_prune_rebuilds_the_structure_and_keeps_optimizer_state_aligned():
    model, pruner = _pruned()
    handle = magprune.sparse_compute(model, pruner)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    pruner.attach(optimizer)
    _train(model, optimizer, 3)
    before = model.fc1.weight.detach().clone()  # read under grad mode and kept, it would pin the old shape
    param = model.fc1.weight_values
    pruner.prune(magprune.LayerSparsity({"fc1.weight": 0.95}))
    assert model.fc1.weight_values is param and param.numel() == int(pruner.masks["fc1.weight"].sum())
    assert optimizer.state[param]["exp_avg"].shape == param.shape
    kept = pruner.masks["fc1.weight"]
    assert torch.equal(model.fc1.weight[kept], before[kept]) and not model.fc1.weight[~kept].any()
    _train(model, optimizer, 3)
    x = torch.randn(4, 784)
    dense_out = model(x)
    handle.remove()
    torch.testing.assert_close(model(x), dense_out, rtol=1e-5, atol=1e-5)
    pruner.check(optimizer)


def test_unsupported_uses_are_refused_clearly():
    model, pruner = _pruned()
    with pytest.raises(ValueError, match="needs a pruned model"):
        magprune.sparse_compute(model, magprune.Pruner(magprune.create_model("lenet-300-100")))
    handle = magprune.sparse_compute(model, pruner)
    with pytest.raises(RuntimeError, match="already on"):
        magprune.sparse_compute(model, pruner)
    with pytest.raises(RuntimeError, match="regrowth"):
        pruner.prune(magprune.LayerSparsity({"fc1.weight": 0.5}), regrow=True)
    x = torch.randn(3, 784, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(model(x).sum(), x, create_graph=True)
    with pytest.raises(TypeError, match="float32"):
        model(torch.randn(3, 784, dtype=torch.float64))
    handle.remove()
    double = magprune.create_model("lenet-300-100").double()
    double_pruner = magprune.Pruner(double)
    double_pruner.prune(magprune.han2015("lenet-300-100"))
    with pytest.raises(TypeError, match="float32 weights"):
        magprune.sparse_compute(double, double_pruner)
    with pytest.raises(ValueError, match="not pruned weights"):
        magprune.sparse_compute(model, pruner, layers=["nope.weight"])


def test_a_linear_layer_follows_its_bias_replaced_removed_or_stepped_in_place():
    # the forward adds the bias (and the backward sums its gradient) through products over the bias's storage,
    # cached per batch size: a replaced storage, a removed bias and an in-place step must all be seen
    model, pruner = _pruned()
    magprune.sparse_compute(model, pruner)
    x = torch.randn(5, 784)
    fc1 = model.fc1

    def expected() -> torch.Tensor:
        return torch.nn.functional.linear(x, fc1.weight, fc1.bias)

    torch.testing.assert_close(fc1(x), expected(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        fc1.bias.add_(1.0)  # in place, as the optimizer steps it
    torch.testing.assert_close(fc1(x), expected(), rtol=1e-5, atol=1e-5)
    fc1.bias.data = torch.randn(300)  # new storage
    torch.testing.assert_close(fc1(x), expected(), rtol=1e-5, atol=1e-5)
    bias = fc1.bias
    fc1.bias = None
    torch.testing.assert_close(fc1(x), torch.nn.functional.linear(x, fc1.weight), rtol=1e-5, atol=1e-5)
    fc1.bias = bias
    y = fc1(x.requires_grad_())
    y.sum().backward()
    torch.testing.assert_close(fc1.bias.grad, torch.full((300,), 5.0))
    fc1.bias = nn.Parameter(torch.zeros(300, dtype=torch.float64))
    with pytest.raises(TypeError, match="contiguous float32 bias"):
        fc1(x)
    fc1.bias = nn.Parameter(torch.zeros(10))  # the kernels would read 300 floats there
    with pytest.raises(TypeError, match=r"bias of shape \[300\], got torch.float32 of shape \[10\]"):
        fc1(x)


def test_functorch_transforms_take_the_public_apply():
    # the layers call autograd's C apply directly, except under a functorch transform, where torch's own apply
    # says what it needs (a setup_context); plain autograd around it is unchanged
    model, pruner = _pruned()
    magprune.sparse_compute(model, pruner)
    x = torch.randn(4, 784)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda inputs: model.fc1(inputs).sum())(x)
    x.requires_grad_()
    model.fc1(x).sum().backward()
    torch.testing.assert_close(x.grad, model.fc1.weight.detach().sum(0).expand(4, -1), rtol=1e-5, atol=1e-5)


DIRECT = ({}, {"padding": 1}, {"padding": (2, 0), "kernel_size": (3, 2)}, {"kernel_size": 1})
IM2COL = ({"stride": 2, "padding": 1}, {"dilation": 2, "padding": 2})


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("geometry", DIRECT + IM2COL,
                         ids=["plain", "padded", "rectangular", "1x1", "stride-pad", "dilated"])
def test_sparse_conv_forward_and_gradients_match_masked_dense_autograd(batch, geometry, monkeypatch):
    # stride 1 takes the direct products, the others im2col: the other path is made to fail here
    other = sparse_training._SparseConvFunction if geometry in DIRECT else sparse_training._DirectConvFunction
    monkeypatch.setattr(other, "apply", lambda *args: pytest.fail("took the other convolution path"))
    torch.manual_seed(batch)
    conv = nn.Conv2d(6, 10, **{"kernel_size": 3, **geometry})
    keep = torch.rand(conv.weight.shape) < 0.15
    keep[3] = False  # an output channel with no kept weight
    keep[:, 4] = False  # an input channel with none
    with torch.no_grad():
        conv.weight.mul_(keep)
    reference = copy.deepcopy(conv)
    pruner = magprune.Pruner(conv)
    pruner.prune(magprune.LayerSparsity({"weight": 1 - float(keep.float().mean())}))
    pruner.masks["weight"].copy_(keep)
    handle = magprune.sparse_compute(conv, pruner, conv_max_density=0.2)
    assert handle.names == ["weight"]
    x = torch.randn(batch, 6, 11, 9, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, expected = conv(x), reference(x_ref)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    dy = torch.randn_like(out)
    out.backward(dy)
    expected.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(handle.layers["weight"].dense_from(conv.weight_values.grad),
                               reference.weight.grad * keep, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(conv.bias.grad, reference.bias.grad, rtol=1e-4, atol=1e-4)
    assert conv.weight.shape == reference.weight.shape and set(conv.state_dict()) == {"weight", "bias"}


def test_direct_conv_reads_the_values_it_is_given_after_steps_rebinding_and_a_deeper_prune():
    torch.manual_seed(4)
    conv = nn.Conv2d(5, 7, 3, padding=1)
    pruner = magprune.Pruner(conv)
    pruner.prune(magprune.LayerSparsity({"weight": 0.9}))
    handle = magprune.sparse_compute(conv, pruner)  # 10% kept: computed sparse by default
    assert handle.names == ["weight"]
    x = torch.randn(2, 5, 6, 6)

    def dense() -> torch.Tensor:
        return nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)

    conv(x)  # the direct products are built and cached here
    with torch.no_grad():
        conv.weight_values.mul_(-2.0)  # in place, as optimizers step
    torch.testing.assert_close(conv(x), dense(), rtol=1e-5, atol=1e-5)
    conv.weight_values.data = torch.randn(conv.weight_values.shape)  # new storage
    torch.testing.assert_close(conv(x), dense(), rtol=1e-5, atol=1e-5)
    handle.sync_dense()
    pruner.prune(magprune.LayerSparsity({"weight": 0.95}))
    assert conv.weight_values.numel() == int(pruner.masks["weight"].sum())
    torch.testing.assert_close(conv(x), dense(), rtol=1e-5, atol=1e-5)


def test_lenet5_trains_its_sparse_conv_and_keeps_the_dense_one_under_the_masks():
    torch.manual_seed(0)
    model = magprune.create_model("lenet-5")
    reference = copy.deepcopy(model)
    pruner, ref_pruner = magprune.Pruner(model), magprune.Pruner(reference)
    pruner.prune(magprune.han2015("lenet-5"))
    ref_pruner.prune(magprune.han2015("lenet-5"))
    assert sorted(magprune.sparse_compute(model, pruner, conv_max_density=0.0).names) == ["fc1.weight",
                                                                                          "fc2.weight"]
    pruner.compute_handles[0].remove()
    handle = magprune.sparse_compute(model, pruner)
    assert sorted(handle.names) == ["conv2.weight", "fc1.weight", "fc2.weight"]  # conv1 (66%) stays dense
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    pruner.attach(optimizer)
    ref_pruner.attach(ref_optimizer)
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        x, y = torch.randn(8, 1, 28, 28, generator=generator), torch.randint(0, 10, (8,), generator=generator)
        for net, opt in ((model, optimizer), (reference, ref_optimizer)):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    pruner.check(optimizer)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-4, atol=1e-5)


def _ddp_rank(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, pruner = _small()
        magprune.sparse_compute(model, pruner, max_density=1.0, min_weights=0)  # a spawned process: no fixture
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        generator = torch.Generator().manual_seed(5)
        for _ in range(5):
            x, y = torch.randn(16, 64, generator=generator), torch.randint(0, 10, (16,), generator=generator)
            optimizer.zero_grad()
            nn.functional.cross_entropy(ddp(x[rank * 8:(rank + 1) * 8]), y[rank * 8:(rank + 1) * 8]).backward()
            optimizer.step()
        torch.save(model.state_dict(), f"{out}/rank{rank}.pt")
        dist.barrier()  # see tests/test_distributed.py::_fit
        finished(out, rank)
    finally:
        dist.destroy_process_group()


def test_ddp_all_reduces_the_compact_gradients(tmp_path):
    import socket


    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn(_ddp_rank, (2, port, str(tmp_path)), 2, str(tmp_path))
    model, pruner = _small()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner.attach(optimizer)
    generator = torch.Generator().manual_seed(5)
    for _ in range(5):  # one process, the whole batch: what two ranks of half a batch each must reproduce
        x, y = torch.randn(16, 64, generator=generator), torch.randint(0, 10, (16,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key, value in model.state_dict().items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-4, atol=1e-5)


def test_layers_hand_each_other_the_batch_minor_layout_without_copies_and_guard_it():
    from magprune.sparse_training import _batch_minor

    model, pruner = _small()
    magprune.sparse_compute(model, pruner)
    x = torch.randn(16, 64, requires_grad=True)
    hidden = model[1](model[0](x))
    # the first layer's output, through tanh, is the transpose of a (48, 16) row-major array: the next layer
    # reads it where it is
    assert hidden.stride() == (1, 16)
    assert _batch_minor(hidden, 16) == (hidden.data_ptr(), None)
    assert _batch_minor(torch.randn(16, 48), 16)[1] is not None  # a plain batch is copied
    assert _batch_minor(hidden[:15], 16)[1] is not None  # so is a batch that is not a multiple of 8 (padded)
    shifted = model[0](x) + 1.0  # an op that saves nothing for its backward (tanh saves its output)
    assert _batch_minor(shifted, 16)[1] is None
    out = model[2](shifted)
    shifted.mul_(2)  # the second layer reads the memory of its input: an in-place change is caught, as for nn.Linear
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
