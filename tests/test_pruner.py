import copy
import io
import pickle

import pytest
import torch
from conftest import SmallConvNet
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from magprune import GlobalSparsity, LayerSparsity, Pruner, PruningInvariantError, StdThreshold, chunked
from magprune import pruner as pruner_module
from magprune.pruner import FIRST_MOMENT_KEYS, SECOND_MOMENT_FILL, SECOND_MOMENT_KEYS

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "sgd-weight-decay": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam-amsgrad-wd": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2, amsgrad=True),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, weight_decay=1e-3),
    "rmsprop-centered": lambda p: torch.optim.RMSprop(p, lr=1e-3, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2, weight_decay=1e-3),
    "adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0, weight_decay=1e-3),
    "adamax": lambda p: torch.optim.Adamax(p, lr=1e-2, weight_decay=1e-3),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2, weight_decay=1e-3),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-2, weight_decay=1e-3),
}


def train(model, optimizer, batch, steps):
    x, y = batch
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def assert_clean(pruner, optimizer):
    """Independent of Pruner.check: pruned weights, first moments exactly 0, all state finite."""
    for name, mask in pruner.masks.items():
        param = pruner.params[name]
        assert torch.equal(param.detach()[~mask], torch.zeros_like(param.detach()[~mask])), name
        for key, value in optimizer.state[param].items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert torch.isfinite(value).all(), (name, key)
                if key in FIRST_MOMENT_KEYS:
                    assert (value[~mask] == 0).all(), (name, key)
    pruner.check(optimizer)


def test_default_targets_are_linear_and_conv_weights(convnet):
    pruner = Pruner(convnet)
    assert list(pruner.params) == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]


def test_targets_by_name_pattern_and_bias(convnet):
    assert list(Pruner(convnet, ["fc*"]).params) == ["fc1.weight", "fc2.weight"]
    assert list(Pruner(convnet, ["conv1"], include_bias=True).params) == ["conv1.weight", "conv1.bias"]
    assert list(Pruner(convnet, ["fc2.bias"]).params) == ["fc2.bias"]
    with pytest.raises(ValueError, match="'nope' matches no module or parameter"):
        Pruner(convnet, ["nope"])
    with pytest.raises(ValueError, match="targets is empty"):
        Pruner(convnet, [])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        Pruner("model")


def test_custom_module_parameters_can_be_targeted():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(10, 10))

        def forward(self, x):
            return x @ self.kernel

    model = Custom()
    with pytest.raises(ValueError, match="no parameters of the layer types"):
        Pruner(model)
    pruner = Pruner(model, ["kernel"])
    pruner.prune(LayerSparsity(0.5))
    assert int((model.kernel == 0).sum()) == 50


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_pruned_entries_stay_exactly_zero_under_every_optimizer(name, convnet, batch):
    optimizer = OPTIMIZERS[name](convnet.parameters())
    train(convnet, optimizer, batch, 10)  # dense state carries over into the pruned phase
    pruner = Pruner(convnet)
    pruner.attach(optimizer)
    pruner.prune(LayerSparsity(0.5))
    train(convnet, optimizer, batch, 50)
    assert_clean(pruner, optimizer)
    first = {n: m.clone() for n, m in pruner.masks.items()}

    pruner.prune(GlobalSparsity(0.8))
    train(convnet, optimizer, batch, 50)
    assert_clean(pruner, optimizer)
    for n, mask in pruner.masks.items():
        assert not (mask & ~first[n]).any(), "re-pruning must only grow the pruned set"
    total = sum(p.numel() for p in pruner.params.values())
    assert abs(pruner.sparsity() - 0.8) <= 0.5 / total  # exactly round(0.8 * total) pruned
    # survivors still train
    before = {n: p.detach().clone() for n, p in pruner.params.items()}
    train(convnet, optimizer, batch, 1)
    if name != "adadelta":  # Adadelta's first steps are tiny by design
        assert any(not torch.equal(before[n], p.detach()) for n, p in pruner.params.items())


def test_naive_gradient_zeroing_is_not_enough_for_adam(convnet, batch):
    """Why the step hook exists: masking only gradients lets Adam's carried-over moments revive pruned weights."""
    optimizer = torch.optim.Adam(convnet.parameters(), lr=1e-2)
    train(convnet, optimizer, batch, 5)
    with torch.no_grad():
        convnet.fc1.weight[:, ::2] = 0
    x, y = batch
    optimizer.zero_grad()
    F.cross_entropy(convnet(x), y).backward()
    convnet.fc1.weight.grad[:, ::2] = 0
    optimizer.step()
    assert (convnet.fc1.weight[:, ::2] != 0).any()


def forward_masked_reference(model, masks):
    """The same model with the mask multiplied into the weight inside forward: connections truly absent."""

    class Mask(nn.Module):
        def __init__(self, mask):
            super().__init__()
            self.register_buffer("mask", mask.float())

        def forward(self, w):
            return w * self.mask

    reference = copy.deepcopy(model)
    for name, mask in masks.items():
        module = reference.get_submodule(name.rsplit(".", 1)[0])
        parametrize.register_parametrization(module, "weight", Mask(mask))
    return reference


@pytest.mark.parametrize("name", ["sgd-momentum", "sgd-nesterov", "sgd-weight-decay", "adam", "adamw", "rmsprop",
                                  "adagrad", "nadam"])
def test_gradient_masking_gives_the_update_of_a_truly_absent_connection(name, convnet, batch):
    convnet.eval()  # dropout off: both models must see the same computation
    pruner = Pruner(convnet)
    pruner.prune(LayerSparsity(0.6))
    reference = forward_masked_reference(convnet, pruner.masks)
    opt = OPTIMIZERS[name](convnet.parameters())
    pruner.attach(opt)
    opt_ref = OPTIMIZERS[name](reference.parameters())
    train(convnet, opt, batch, 30)
    train(reference, opt_ref, batch, 30)
    for pname, mask in pruner.masks.items():
        module = reference.get_submodule(pname.rsplit(".", 1)[0])
        effective = module.weight.detach()
        torch.testing.assert_close(convnet.get_parameter(pname).detach()[mask], effective[mask], rtol=1e-5,
                                   atol=1e-6)
        assert (effective[~mask] == 0).all()
    for pname in ("conv1.bias", "fc2.bias"):
        torch.testing.assert_close(convnet.get_parameter(pname), reference.get_parameter(pname), rtol=1e-5,
                                   atol=1e-6)


def test_gradients_are_masked_right_after_backward(convnet, batch):
    """Gradient clipping and logging between backward() and step() already see the masked gradient."""
    pruner = Pruner(convnet)
    pruner.prune(LayerSparsity(0.7))
    x, y = batch
    F.cross_entropy(convnet(x), y).backward()
    for name, mask in pruner.masks.items():
        assert (pruner.params[name].grad[~mask] == 0).all()
        assert pruner.params[name].grad[mask].abs().sum() > 0


def test_second_moment_state_stays_normal_and_cheap(convnet, batch):
    optimizer = torch.optim.Adam(convnet.parameters(), lr=1e-3, betas=(0.9, 0.5))  # fast decay: 0.5**100 ~ 1e-30
    pruner = Pruner(convnet, refresh_every=50)
    pruner.attach(optimizer)
    train(convnet, optimizer, batch, 3)
    pruner.prune(LayerSparsity(0.5))
    train(convnet, optimizer, batch, 120)
    tiny = torch.finfo(torch.float32).tiny
    for name, mask in pruner.masks.items():
        state = optimizer.state[pruner.params[name]]
        assert (state["exp_avg_sq"][~mask] >= tiny).all(), "denormal or zero second moment at pruned positions"
        assert (state["exp_avg_sq"][~mask] <= SECOND_MOMENT_FILL).all()
    assert "exp_avg_sq" in SECOND_MOMENT_KEYS


def test_attach_after_prune_cleans_dense_state(convnet, batch):
    optimizer = torch.optim.SGD(convnet.parameters(), lr=0.05, momentum=0.9)
    train(convnet, optimizer, batch, 5)
    pruner = Pruner(convnet)
    pruner.prune(LayerSparsity(0.5))
    with pytest.raises(PruningInvariantError, match="momentum_buffer"):
        pruner.check(optimizer)
    pruner.attach(optimizer)
    pruner.check()
    train(convnet, optimizer, batch, 5)
    assert_clean(pruner, optimizer)


def test_check_catches_a_revived_weight(convnet):
    pruner = Pruner(convnet)
    pruner.prune(LayerSparsity(0.5))
    pruner.check()
    with torch.no_grad():
        convnet.fc1.weight[~pruner.masks["fc1.weight"]] = 1.0
    with pytest.raises(PruningInvariantError, match="fc1.weight"):
        pruner.check()
    pruner.apply_masks()
    pruner.check()


def test_regrow_only_when_asked(convnet):
    pruner = Pruner(convnet, ["fc1"])
    pruner.prune(LayerSparsity(0.9))
    pruner.prune(LayerSparsity(0.5))
    assert pruner.densities()["fc1.weight"] == pytest.approx(0.1, abs=1e-3)
    optimizer = torch.optim.Adam(convnet.parameters())
    pruner.attach(optimizer)
    pruner.prune(LayerSparsity(0.5), regrow=True)
    assert pruner.densities()["fc1.weight"] == pytest.approx(0.5, abs=1e-3)


def test_state_dict_keys_unchanged_and_load_strict_into_fresh_model(convnet, batch):
    keys = list(convnet.state_dict())
    pruner = Pruner(convnet)
    optimizer = torch.optim.Adam(convnet.parameters())
    pruner.attach(optimizer)
    pruner.prune(LayerSparsity(0.5))
    train(convnet, optimizer, batch, 3)
    assert list(convnet.state_dict()) == keys
    assert not any("orig" in k or "mask" in k for k in keys)
    fresh = SmallConvNet()
    fresh.load_state_dict(convnet.state_dict(), strict=True)
    x, _ = batch
    convnet.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(x), convnet(x))


def test_deepcopy_pickle_and_torch_save_of_a_pruned_model(convnet, batch):
    pruner = Pruner(convnet)
    optimizer = torch.optim.SGD(convnet.parameters(), lr=0.1, momentum=0.9)
    pruner.attach(optimizer)
    pruner.prune(LayerSparsity(0.5))
    train(convnet, optimizer, batch, 2)
    x, _ = batch
    convnet.eval()
    expected = convnet(x)
    clone = copy.deepcopy(convnet)
    unpickled = pickle.loads(pickle.dumps(convnet))
    buffer = io.BytesIO()
    torch.save(convnet, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)  # our own file, written just above
    for other in (clone, unpickled, loaded):
        torch.testing.assert_close(other(x), expected)
        assert torch.equal(other.fc1.weight == 0, convnet.fc1.weight == 0)


def test_pruner_state_dict_round_trip(convnet, batch):
    pruner = Pruner(convnet)
    pruner.prune(GlobalSparsity(0.7))
    buffer = io.BytesIO()
    torch.save({"model": convnet.state_dict(), "pruner": pruner.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = SmallConvNet()
    fresh.load_state_dict(saved["model"])
    fresh_pruner = Pruner(fresh)
    fresh_pruner.load_state_dict(saved["pruner"])
    for name, mask in pruner.masks.items():
        assert torch.equal(fresh_pruner.masks[name], mask)
        assert fresh_pruner.masks[name].dtype == torch.bool
    optimizer = torch.optim.Adam(fresh.parameters())
    fresh_pruner.attach(optimizer)
    train(fresh, optimizer, batch, 5)
    assert_clean(fresh_pruner, optimizer)


def test_load_state_dict_rejects_bad_masks(convnet):
    pruner = Pruner(convnet)
    with pytest.raises(ValueError, match="'masks' entry"):
        pruner.load_state_dict({"weights": {}})
    with pytest.raises(ValueError, match="not targets of this pruner"):
        pruner.load_state_dict({"masks": {"fc9.weight": torch.ones(3, dtype=torch.bool)}})
    with pytest.raises(ValueError, match="bool tensor of shape"):
        pruner.load_state_dict({"masks": {"fc2.weight": torch.ones(5, 32)}})
    with pytest.raises(ValueError, match="bool tensor of shape"):
        pruner.load_state_dict({"masks": {"fc2.weight": torch.ones(4, 4, dtype=torch.bool)}})


def test_criterion_returning_bad_masks_is_refused(convnet):
    pruner = Pruner(convnet)
    with pytest.raises(ValueError, match="not a target"):
        pruner.prune(lambda w, m: {"fc9.weight": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="bool tensor"):
        pruner.prune(lambda w, m: {"fc2.weight": torch.ones(5, 32)})
    before = convnet.fc1.weight.detach().clone()
    with pytest.raises(ValueError, match="bool tensor"):
        pruner.prune(lambda w, m: {"fc1.weight": torch.zeros(32, 96, dtype=torch.bool), "fc2.weight": None})
    assert torch.equal(convnet.fc1.weight, before) and not pruner.masks  # nothing half-applied


def test_dtype_change_after_pruning_and_uint8_masks(convnet, batch):
    pruner = Pruner(convnet, fast_masks=False)
    optimizer = torch.optim.SGD(convnet.parameters(), lr=0.1, momentum=0.9)
    pruner.attach(optimizer)
    pruner.prune(LayerSparsity(0.5))
    convnet.double()
    x, y = batch
    train(convnet, optimizer, (x.double(), y), 5)
    assert_clean(pruner, optimizer)


def test_remove_detaches_hooks(convnet, batch):
    pruner = Pruner(convnet)
    optimizer = torch.optim.SGD(convnet.parameters(), lr=0.1)
    handle = pruner.attach(optimizer)
    assert pruner.attach(optimizer) is handle
    pruner.prune(LayerSparsity(0.5))
    pruner.remove()
    train(convnet, optimizer, batch, 2)
    with pytest.raises(PruningInvariantError):
        pruner.check()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_auto_rezero_is_bit_identical_to_rezeroing_every_step(name, batch):
    """For the audited optimizers the per-step re-zero is a no-op: skipping it changes no bit."""
    results = []
    for rezero in ("auto", "always"):
        torch.manual_seed(0)
        model = SmallConvNet().eval()
        optimizer = OPTIMIZERS[name](model.parameters())
        train(model, optimizer, batch, 5)
        pruner = Pruner(model, rezero=rezero, refresh_every=7)
        handle = pruner.attach(optimizer)
        assert handle.rezero_every_step is (rezero == "always")
        pruner.prune(LayerSparsity(0.6))
        train(model, optimizer, batch, 30)
        pruner.prune(GlobalSparsity(0.8))
        train(model, optimizer, batch, 30)
        assert_clean(pruner, optimizer)
        results.append([p.detach().clone() for p in model.parameters()])
    for auto, always in zip(*results, strict=True):
        assert torch.equal(auto, always)


def test_unknown_optimizer_is_rezeroed_every_step(convnet, batch):
    class Reviving(torch.optim.SGD):
        """Moves every weight, gradient or not: what a user's optimizer might do."""

        @torch.no_grad()
        def step(self, closure=None):
            super().step(closure)
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(1e-3)

    optimizer = Reviving(convnet.parameters(), lr=0.01)
    pruner = Pruner(convnet)
    assert pruner.attach(optimizer).rezero_every_step
    pruner.prune(LayerSparsity(0.5))
    train(convnet, optimizer, batch, 5)
    pruner.check()


def test_auto_mode_repairs_a_hand_written_gradient(convnet, batch):
    optimizer = torch.optim.SGD(convnet.parameters(), lr=0.1)
    pruner = Pruner(convnet, refresh_every=2)
    handle = pruner.attach(optimizer)
    pruner.prune(LayerSparsity(0.5))
    for p in convnet.parameters():
        p.grad = torch.ones_like(p)  # bypasses autograd and so the gradient hook
    optimizer.step()
    with pytest.warns(RuntimeWarning, match="re-zeroed"):
        optimizer.step()
    pruner.check()
    assert handle.rezero_every_step
    with pytest.raises(ValueError, match="rezero must be"):
        Pruner(convnet, rezero="never")


def test_revival_check_follows_masks_changed_in_place(convnet, batch):
    optimizer = torch.optim.SGD(convnet.parameters(), lr=0.1)
    pruner = Pruner(convnet, refresh_every=1)
    handle = pruner.attach(optimizer)
    pruner.prune(LayerSparsity(0.5))
    train(convnet, optimizer, batch, 2)  # the kept counts are cached here
    pruner.prune(LayerSparsity(0.8))  # masks shrink in place: the cached counts must not be reused
    assert not handle._revived()
    name = next(iter(pruner.masks))
    with torch.no_grad():
        flat = pruner.params[name].view(-1)
        flat[int((~pruner.masks[name]).view(-1).nonzero()[0])] = 1.0  # one pruned weight comes back: fewer
    assert handle._revived()  # nonzeros than the first prune kept, so a stale count would miss it


def test_rezero_after_a_second_prune_uses_the_new_mask(convnet, batch):
    """Plain SGD keeps no state; its cached multipliers must still follow a deeper prune."""
    optimizer = torch.optim.SGD(convnet.parameters(), lr=0.1)
    pruner = Pruner(convnet, rezero="always")
    pruner.attach(optimizer)
    pruner.prune(LayerSparsity(0.3))
    train(convnet, optimizer, batch, 2)
    pruner.prune(LayerSparsity(0.7))
    with torch.no_grad():  # a weight moved outside any gradient: only the per-step re-zero can catch it
        for name, mask in pruner.masks.items():
            pruner.params[name][~mask] = 1.0
    train(convnet, optimizer, batch, 1)
    assert_clean(pruner, optimizer)


@pytest.mark.parametrize("name", ["sgd-weight-decay", "adam", "rmsprop", "adadelta"])
def test_bit_packed_masks_train_bit_identically_to_fp32_multipliers(name, batch, monkeypatch):
    """Large layers are masked by the compiled kernel from 1-bit masks; forced onto small ones here, the training
    must be bit-for-bit that of the fp32 multiply, with no fp32 mask copies made."""
    results = []
    for packed_from in (1, 1 << 62):
        monkeypatch.setattr(pruner_module, "PACKED_MIN_NUMEL", packed_from)
        torch.manual_seed(0)
        model = SmallConvNet().eval()
        optimizer = OPTIMIZERS[name](model.parameters())
        train(model, optimizer, batch, 5)
        pruner = Pruner(model, rezero="always", refresh_every=3)
        pruner.attach(optimizer)
        pruner.prune(LayerSparsity(0.6))
        train(model, optimizer, batch, 10)
        pruner.prune(GlobalSparsity(0.8))  # masks change in place: the packed copies must follow
        train(model, optimizer, batch, 10)
        assert_clean(pruner, optimizer)
        if packed_from == 1:
            assert not pruner._multipliers and set(pruner._packed) == set(pruner.masks)
            for mask_name, (_, packed) in pruner._packed.items():
                assert packed.bits.nbytes == -(-pruner.masks[mask_name].numel() // 8)
        else:
            assert not pruner._packed
        results.append([p.detach().clone() for p in model.parameters()]
                       + [v.clone() for s in optimizer.state.values() for v in s.values()
                          if isinstance(v, torch.Tensor) and v.dim()])
    for packed, multiplied in zip(*results, strict=True):
        assert torch.equal(packed, multiplied)


def test_bit_packed_masks_only_for_contiguous_float32_cpu_tensors(convnet, monkeypatch):
    monkeypatch.setattr(pruner_module, "PACKED_MIN_NUMEL", 1)
    pruner = Pruner(convnet)
    pruner.prune(LayerSparsity(0.5))
    name = "fc1.weight"
    weight = pruner.params[name].detach()
    assert pruner._packed_mask(name, weight) is not None
    assert pruner._packed_mask(name, weight.double()) is None
    assert pruner._packed_mask(name, weight.t()) is None  # not contiguous
    lean = Pruner(convnet, fast_masks=False)
    lean.prune(LayerSparsity(0.5))
    assert lean._packed_mask(name, weight) is None


def test_check_counts_chunk_by_chunk(convnet, batch, monkeypatch):
    """check() works on chunks (no full-size temporaries on a large model) and still finds one revived weight, a
    dirty momentum entry and a non-finite state entry anywhere."""
    monkeypatch.setattr(chunked, "CHUNK", 7)
    optimizer = torch.optim.SGD(convnet.parameters(), lr=0.1, momentum=0.9)
    pruner = Pruner(convnet)
    pruner.attach(optimizer)
    pruner.prune(LayerSparsity(0.5))
    train(convnet, optimizer, batch, 2)
    pruner.check()
    name = "fc1.weight"
    param, mask = pruner.params[name], pruner.masks[name]
    last_pruned = int((~mask).view(-1).nonzero()[-1])
    with torch.no_grad():
        param.view(-1)[last_pruned] = 1e-30
    with pytest.raises(PruningInvariantError, match=r"fc1.weight: 1 pruned weights are nonzero"):
        pruner.check()
    with torch.no_grad():
        param.view(-1)[last_pruned] = 0.0
        optimizer.state[param]["momentum_buffer"].view(-1)[last_pruned] = 1.0
    with pytest.raises(PruningInvariantError, match="'momentum_buffer' is nonzero at pruned positions"):
        pruner.check()
    optimizer.state[param]["momentum_buffer"].view(-1)[last_pruned] = float("inf")
    with pytest.raises(PruningInvariantError, match="'momentum_buffer' is not finite"):
        pruner.check()


# ---------------------------------------------------------------- robustness to the workflows people use
def test_frozen_targets_prune_and_get_their_hook_once_unfrozen(convnet, batch):
    convnet.requires_grad_(False)  # inference-only pruning
    pruner = Pruner(convnet)
    pruner.prune(LayerSparsity(0.5))
    assert all(d == 0.5 for d in pruner.densities().values())
    convnet.requires_grad_(True)
    optimizer = torch.optim.AdamW(convnet.parameters(), lr=1e-2)
    pruner.attach(optimizer)
    train(convnet, optimizer, batch, 5)
    assert_clean(pruner, optimizer)
    pruner.check()


def test_prune_after_freeze_then_unfreeze_with_an_optimizer_attached_while_frozen(convnet, batch):
    from magprune import freeze

    frozen = freeze(convnet, "conv")
    optimizer = torch.optim.Adam(convnet.parameters(), lr=1e-2)
    pruner = Pruner(convnet)
    pruner.attach(optimizer)
    pruner.prune(LayerSparsity(0.6))
    train(convnet, optimizer, batch, 3)
    frozen.remove()  # conv layers train from here on; their hooks come at the next step
    train(convnet, optimizer, batch, 5)
    assert_clean(pruner, optimizer)
    pruner.check()


def test_a_prune_that_fails_changes_nothing(convnet):
    pruner = Pruner(convnet)
    before = {n: p.detach().clone() for n, p in pruner.params.items()}

    def half_bad(weights, masks):
        out = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
        out["fc2.weight"] = torch.ones(3, dtype=torch.bool)
        return out

    with pytest.raises(ValueError, match="fc2.weight"):
        pruner.prune(half_bad)
    assert not pruner.masks
    for name, param in pruner.params.items():
        assert torch.equal(param.detach(), before[name])


@pytest.mark.parametrize("how", ["assign", "to_empty", "reassign"])
def test_replaced_parameters_are_followed_by_name(convnet, batch, how):
    pruner = Pruner(convnet)
    pruner.prune(LayerSparsity(0.7))
    state = {k: v.clone() for k, v in convnet.state_dict().items()}
    if how == "assign":
        convnet.load_state_dict({k: v.clone() + 1.0 for k, v in state.items()}, assign=True)  # pruned entries not 0
    elif how == "to_empty":  # via the meta device: new Parameter objects
        convnet.to("meta").to_empty(device="cpu")
        convnet.load_state_dict({k: v + 1.0 for k, v in state.items()})
    else:
        convnet.fc1.weight = nn.Parameter(torch.randn_like(convnet.fc1.weight))
    assert pruner.params["fc1.weight"] is not convnet.fc1.weight
    with pytest.raises(PruningInvariantError, match="fc1.weight: .* pruned weights are nonzero"):
        pruner.check()  # it looks at what the model holds now
    optimizer = torch.optim.AdamW(convnet.parameters(), lr=1e-2)
    pruner.attach(optimizer)
    assert pruner.params["fc1.weight"] is convnet.fc1.weight
    train(convnet, optimizer, batch, 5)
    assert_clean(pruner, optimizer)
    pruner.check()
    for name, mask in pruner.masks.items():
        assert not convnet.get_parameter(name).detach()[~mask].any(), name


def test_replacement_followed_at_the_next_step_of_an_attached_optimizer(convnet, batch):
    optimizer = torch.optim.SGD(convnet.parameters(), lr=0.1, momentum=0.9)
    pruner = Pruner(convnet)
    pruner.attach(optimizer)
    pruner.prune(LayerSparsity(0.5))
    new = nn.Parameter(convnet.fc2.weight.detach() + 1.0)
    convnet.fc2.weight = new
    optimizer.param_groups[0]["params"] = list(convnet.parameters())
    train(convnet, optimizer, batch, 3)
    assert pruner.params["fc2.weight"] is new
    assert_clean(pruner, optimizer)


def test_replacement_of_another_shape_is_refused(convnet):
    pruner = Pruner(convnet)
    pruner.prune(LayerSparsity(0.5))
    convnet.fc2 = nn.Linear(32, 7)
    with pytest.raises(RuntimeError, match=r"'fc2.weight' was replaced by a parameter of shape \(7, 32\)"):
        pruner.prune(LayerSparsity(0.5))
    with pytest.raises(PruningInvariantError, match="fc2.weight: the model's parameter has shape"):
        pruner.check()


def test_attach_of_an_optimizer_without_any_target_is_refused(convnet):
    pruner = Pruner(convnet)
    other = torch.optim.SGD(SmallConvNet().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="holds none of the pruner's 4 target parameters"):
        pruner.attach(other)


def test_a_mask_returned_for_two_layers_is_copied():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    pruner = Pruner(model)
    shared = torch.rand(4, 4) < 0.5

    def same_tensor(weights, masks):
        return dict.fromkeys(weights, shared)

    original = shared.clone()
    pruner.prune(same_tensor)
    pruner.prune(LayerSparsity({"0": 0.9}))
    assert torch.equal(shared, original)
    assert torch.equal(pruner.masks["1.weight"], original)
    assert pruner.masks["0.weight"].data_ptr() != pruner.masks["1.weight"].data_ptr()


def test_a_prune_that_empties_a_layer_warns():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    pruner = Pruner(model)
    with pytest.warns(RuntimeWarning, match=r"removed every connection of \['0.weight'\]"):
        pruner.prune(lambda w, m: {"0.weight": torch.zeros(4, 4, dtype=torch.bool)})
    with pytest.warns(RuntimeWarning, match="removed every connection"):
        Pruner(model).prune(StdThreshold(1e6))
    with pytest.warns(RuntimeWarning, match="removed every connection"):
        Pruner(nn.Sequential(nn.Linear(100, 1), nn.Linear(1000, 1))).prune(GlobalSparsity(0.999))


def test_optimizers_are_held_weakly(convnet, batch):
    import gc
    import weakref

    pruner = Pruner(convnet)
    optimizer = torch.optim.Adam(convnet.parameters(), lr=1e-2)
    pruner.attach(optimizer)
    pruner.prune(LayerSparsity(0.5))
    train(convnet, optimizer, batch, 2)
    ref = weakref.ref(optimizer)
    del optimizer
    gc.collect()
    assert ref() is None
    assert not pruner._optimizers
    pruner.prune(LayerSparsity(0.6))
    pruner.check()
