"""Deploy room (bench): latency of a model's layers and of the whole model, dense against sparse."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from magprune.deploy.modules import SparseConv2d, SparseLinear
from magprune.deploy.sparsify import best_ms, layer_input_shapes, sparsify


@dataclass(frozen=True)
class BenchRow:
    name: str
    shape: str
    density: float
    batch_size: int
    dense_ms: float
    sparse_ms: float

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms


def bench_model(model: nn.Module, input_shape: tuple[int, ...], batch_sizes: tuple[int, ...] = (1, 32, 256),
                repeats: int = 10) -> list[BenchRow]:
    """Latency, dense vs sparse, of every Linear/Conv2d layer and of the whole model (sparse = every candidate
    layer sparse, i.e. ``sparsify`` with no speed test) at each batch size; best of ``repeats`` runs."""
    model = copy.deepcopy(model).eval()
    rows = []
    for batch in batch_sizes:
        x = torch.randn(batch, *input_shape)
        shapes = layer_input_shapes(model, x)
        whole = sparsify(model, batch_size=batch, example_input=x, min_speedup=0.0, repeats=1)
        with torch.inference_mode():
            for name, module in model.named_modules():
                sparse = whole.get_submodule(name) if name else None
                if not isinstance(sparse, SparseLinear | SparseConv2d):
                    continue
                layer_x = torch.randn(batch, *shapes[name])
                shape = "x".join(map(str, module.weight.shape))
                rows.append(BenchRow(name, shape, sparse.density, batch,
                                     best_ms(lambda m=module, x=layer_x: m(x), repeats),
                                     best_ms(lambda m=sparse, x=layer_x: m(x), repeats)))
            n_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d))
            n_kept = sum(int(m.weight.count_nonzero()) for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d))
            rows.append(BenchRow("(whole model)", "x".join(map(str, (batch, *input_shape))), n_kept / n_weights,
                                 batch, best_ms(lambda x=x: model(x), repeats),
                                 best_ms(lambda x=x, m=whole: m(x), repeats)))
    return rows


def format_bench(rows: list[BenchRow]) -> str:
    lines = [f"{'layer':<14} {'weight':<14} {'density':>7} {'batch':>5} {'dense ms':>9} {'sparse ms':>9} "
             f"{'speedup':>7} {'dense/s':>9} {'sparse/s':>9}"]
    for r in rows:
        lines.append(f"{r.name:<14} {r.shape:<14} {r.density:>7.3f} {r.batch_size:>5} {r.dense_ms:>9.3f} "
                     f"{r.sparse_ms:>9.3f} {r.speedup:>6.2f}x {1e3 * r.batch_size / r.dense_ms:>9.0f} "
                     f"{1e3 * r.batch_size / r.sparse_ms:>9.0f}")
    return "\n".join(lines)
