"""Conformance: the whole life of a pruned model on architectures nobody here wrote (transformers BERT, GPT-2 with
tied embeddings and ViT in tiny random configs; torch MultiheadAttention, TransformerEncoderLayer, LSTM, GRU; a
Conv+BatchNorm residual CNN). No downloads: every model is built from a config with random weights."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import magprune
from magprune import LayerSparsity, Pruner
from magprune.deploy import load_compressed, load_compressed_into, save_compressed, sparsify

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

BATCH, TOKENS, VOCAB, CLASSES = 4, 8, 96, 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small run fastest on one thread (and the test machine's cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Case:
    make: Callable[[], nn.Module]
    example: Callable[[torch.Generator], object]  # a batch the model takes: tensor, or dict of keyword arguments
    loss: Callable[[nn.Module, object, torch.Tensor], torch.Tensor]

    def batch(self, seed: int) -> tuple[object, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return self.example(g), torch.randint(0, CLASSES, (BATCH,), generator=g)


def _logits(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def _classify(model, x, y):
    out = model(**x) if isinstance(x, dict) else model(x)
    return F.cross_entropy(_logits(out).float(), y)


def _tokens(g):
    return {"input_ids": torch.randint(0, VOCAB, (BATCH, TOKENS), generator=g),
            "attention_mask": torch.ones(BATCH, TOKENS, dtype=torch.long)}


def _bert():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=CLASSES)
    return transformers.BertForSequenceClassification(config)


def _gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    return transformers.GPT2LMHeadModel(config)


def _lm_loss(model, x, y):
    return model(**x, labels=x["input_ids"]).loss


def _vit():
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=CLASSES)
    return transformers.ViTForImageClassification(config)


class MHANet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(12, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, CLASSES)

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


class EncoderNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(12, 32)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(32, CLASSES)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


class RNNNet(nn.Module):
    def __init__(self, kind: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = kind(12, 24, num_layers=2, batch_first=True, bidirectional=kind is nn.GRU)
        self.head = nn.Linear(24 * (2 if kind is nn.GRU else 1), CLASSES)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class ResidualCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv3, self.bn3 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(h + self.bn3(self.conv3(F.relu(self.bn2(self.conv2(h))))))
        return self.fc(h.mean((2, 3)))


def _sequence(g):
    return torch.randn(BATCH, TOKENS, 12, generator=g)


def _image(g):
    return torch.randn(BATCH, 3, 16, 16, generator=g)


CASES = {
    "bert": Case(_bert, _tokens, _classify),
    "gpt2-tied": Case(_gpt2, _tokens, _lm_loss),
    "vit": Case(_vit, lambda g: {"pixel_values": _image(g)}, _classify),
    "multihead-attention": Case(MHANet, _sequence, _classify),
    "transformer-encoder": Case(EncoderNet, _sequence, _classify),
    "lstm": Case(lambda: RNNNet(nn.LSTM), _sequence, _classify),
    "gru": Case(lambda: RNNNet(nn.GRU), _sequence, _classify),
    "residual-cnn": Case(ResidualCNN, _image, _classify),
}


def _build(case: Case, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return case.make()


def _weight_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The default targets, counted here without magprune: every weight matrix of a linear, conv, attention or
    recurrent layer (transformers' Conv1D by its name), each tied parameter once, none tied to an embedding."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    found, seen = [], set()
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d) or type(module).__name__ == "Conv1D":
            params = [module.weight]
        elif isinstance(module, nn.MultiheadAttention):
            params = [module.in_proj_weight]
        elif isinstance(module, nn.RNNBase):
            params = [p for n, p in module.named_parameters(recurse=False) if n.startswith("weight")]
        else:
            continue
        for p in params:
            if id(p) not in seen and id(p) not in embedded:
                seen.add(id(p))
                found.append(p)
    return found


def _outputs(model: nn.Module, x) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    if isinstance(out, torch.Tensor):
        return [out]
    return [v for v in out.values() if isinstance(v, torch.Tensor)]


def _assert_same_outputs(got: list[torch.Tensor], want: list[torch.Tensor], exact: bool = True) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@functools.cache
def _cpu_runs_bf16_lstm() -> bool:
    """oneDNN's bf16 LSTM runs where the CPU has AVX-512 bf16 (the Intel machine); on AMD Zen 3 it raises 'could not
    create a primitive descriptor for the LSTM forward propagation primitive' (a clean-clone CI run, 2026-12-02)."""
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nn.LSTM(4, 4)(torch.randn(2, 1, 4))
        return True
    except RuntimeError:
        return False


def _train(model, optimizer, case: Case, seed: int, steps: int, accumulate: int = 1, autocast: bool = False):
    model.train()
    if autocast and any(isinstance(m, nn.LSTM) for m in model.modules()):
        autocast = _cpu_runs_bf16_lstm()  # elsewhere the LSTM case trains in float32
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for micro in range(accumulate):
            x, y = case.batch(seed + 10 * step + micro)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = case.loss(model, x, y) / accumulate
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()


def _assert_pruned_and_clean(model: nn.Module, masks: dict[str, torch.Tensor], optimizer) -> None:
    """Independent of Pruner.check: what the model holds now is exactly 0 where pruned; AdamW's first moment is 0
    there and all its state finite."""
    for name, mask in masks.items():
        param = model.get_parameter(name)
        assert not param.detach()[~mask].any(), f"{name}: a pruned weight is nonzero"
        state = optimizer.state[param]
        assert not state["exp_avg"][~mask].any(), f"{name}: exp_avg nonzero at a pruned position"
        assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_whole_life_of_a_pruned_model(name, tmp_path):
    case = CASES[name]
    model = _build(case, 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    _train(model, optimizer, case, 0, 1)  # dense, with state the pruner must clean

    pruner = Pruner(model)  # no arguments: the default targets are the real weights
    assert {id(p) for p in pruner.params.values()} == {id(p) for p in _weight_matrices(model)}
    pruner.attach(optimizer)
    pruner.prune(LayerSparsity(0.5))
    _train(model, optimizer, case, 100, 1, accumulate=2, autocast=True)
    pruner.prune(LayerSparsity(0.8))
    _train(model, optimizer, case, 200, 2, accumulate=2, autocast=True)
    assert pruner.sparsity() == pytest.approx(0.8, abs=0.01)
    _assert_pruned_and_clean(model, pruner.masks, optimizer)
    pruner.check()

    model.eval()
    x, _ = case.batch(999)
    want = _outputs(model, x)
    fresh = _build(case, 1)
    fresh.load_state_dict(model.state_dict(), strict=True)
    _assert_same_outputs(_outputs(fresh.eval(), x), want)
    _assert_same_outputs(_outputs(copy.deepcopy(model), x), want)

    save_compressed(model, tmp_path / "model.safetensors")
    loaded = load_compressed(tmp_path / "model.safetensors")
    for key, tensor in model.state_dict().items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key
    restored = load_compressed_into(_build(case, 2), tmp_path / "model.safetensors")
    _assert_same_outputs(_outputs(restored.eval(), x), want)

    fast = sparsify(model, example_input=x, min_speedup=0.0, repeats=1)
    assert any(d.converted for d in fast.sparsify_decisions), magprune.deploy.format_decisions(fast.sparsify_decisions)
    _assert_same_outputs(_outputs(fast, x), want, exact=False)

    report = magprune.sparsity_report(model, x)
    weights = _weight_matrices(model)
    assert report.weights == sum(p.numel() for p in weights)
    assert report.nonzero == sum(int(p.count_nonzero()) for p in weights)
    assert report.flops is not None and report.flops > 0  # every row's FLOPs found


def test_gpt2_keeps_its_tie_and_the_tied_head_is_targeted_by_name():
    model = _build(CASES["gpt2-tied"], 0)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "lm_head.weight" not in Pruner(model).params  # an embedding: only when asked
    pruner = Pruner(model, ["lm_head"])
    assert list(pruner.params) == ["lm_head.weight"]
    pruner.prune(LayerSparsity(0.5))
    assert int((model.transformer.wte.weight == 0).sum()) == model.lm_head.weight.numel() // 2
    fresh = _build(CASES["gpt2-tied"], 1)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("name", sorted(CASES))
def test_sparse_compute_retrains_like_masked_dense(name):
    """Retraining with sparse compute gives masked-dense training's weights within rounding on every model here
    (dropout off: its mask is drawn in memory order, see docs/training.md), GPT-2's transformers Conv1D layers
    included. This is how nn.MultiheadAttention's out_proj was found never training under sparse compute."""
    case = CASES[name]
    runs = []
    for sparse in (False, True):
        model = _build(case, 0)
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        pruner = Pruner(model)
        pruner.prune(LayerSparsity(0.9))
        handle = None
        if sparse:
            handle = magprune.sparse_compute(model, pruner, min_weights=0)
            if name == "gpt2-tied":
                assert len(handle.names) == 8 and all(".h." in n for n in handle.names)  # every Conv1D
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        pruner.attach(optimizer)
        _train(model, optimizer, case, 0, 4)
        if handle is not None:
            assert handle.names
            handle.remove()
        pruner.check(optimizer)
        runs.append(model.state_dict())
    start = _build(case, 0).state_dict()
    dense, sparse = runs
    for key, value in dense.items():
        if key in pruner.masks:
            assert not torch.equal(value, start[key]), f"{key} did not train"
        torch.testing.assert_close(sparse[key], value, rtol=1e-4, atol=2e-5, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("name", ["bert", "gpt2-tied", "vit", "residual-cnn"])
def test_sparse_compute_trains_under_autocast(name):
    """bf16 autocast, as these models are often trained: the sparse layers compute in float32 (an attention output
    in bf16 reached them and was refused before)."""
    case = CASES[name]
    model = _build(case, 0)
    pruner = Pruner(model)
    pruner.prune(LayerSparsity(0.9))
    handle = magprune.sparse_compute(model, pruner, min_weights=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner.attach(optimizer)
    before = {name: layer.values.detach().clone() for name, layer in handle.layers.items()}
    _train(model, optimizer, case, 0, 2, autocast=True)
    for key, layer in handle.layers.items():
        assert torch.isfinite(layer.values).all() and not torch.equal(layer.values, before[key]), key
    handle.remove()
    _assert_pruned_and_clean(model, pruner.masks, optimizer)


def test_gpt2_conv1d_computes_sparse_with_plain_state_dict_and_follows_a_deeper_prune():
    """transformers' Conv1D stores its weight (in, out): the compact values map to that layout in the state_dict,
    in a deeper prune (which keeps the optimizer state aligned) and back in the dense weight on remove()."""
    case = CASES["gpt2-tied"]
    model = _build(case, 0)
    pruner = Pruner(model)
    pruner.prune(LayerSparsity(0.8))
    handle = magprune.sparse_compute(model, pruner, min_weights=0)
    layer = model.transformer.h[0].mlp.c_fc
    assert "transformer.h.0.mlp.c_fc.weight" in handle.names and layer.weight.shape == (32, 128)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    pruner.attach(optimizer)
    _train(model, optimizer, case, 0, 2)
    state = model.state_dict()
    assert state["transformer.h.0.mlp.c_fc.weight"].shape == (32, 128)
    plain = _build(case, 1)
    plain.load_state_dict(state, strict=True)
    x, _ = case.batch(5)
    model.eval()
    plain.eval()
    torch.testing.assert_close(_outputs(model, x)[0], _outputs(plain, x)[0], rtol=1e-4, atol=1e-5)
    pruner.prune(LayerSparsity(0.9))  # deeper: the structure is rebuilt in the transposed layout
    assert layer.weight_values.numel() == int(pruner.masks["transformer.h.0.mlp.c_fc.weight"].sum())
    model.train()
    _train(model, optimizer, case, 10, 2)
    dense_view = layer.weight.detach().clone()
    handle.remove()
    assert torch.equal(layer.weight.detach(), dense_view)
    pruner.check(optimizer)
    assert pruner.sparsity() == pytest.approx(0.9, abs=0.01)
