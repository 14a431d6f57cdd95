"""Report room: per-layer weights, nonzeros, FLOPs and the compression ratio of a (pruned) model, as text or dict."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from magprune.targets import DEFAULT_LAYER_TYPES


@dataclass
class LayerRow:
    layer: str
    kind: str
    weights: int
    nonzero: int
    flops: int | None = None  # dense FLOPs per sample, 2 x multiply-adds (Han et al.'s convention)

    @property
    def density(self) -> float:
        return self.nonzero / self.weights if self.weights else 1.0

    @property
    def remaining_flops(self) -> int | None:
        # Every weight of a layer is used the same number of times per sample, so FLOPs scale with its density.
        return None if self.flops is None else round(self.flops * self.density)


@dataclass
class SparsityReport:
    rows: list[LayerRow]
    params_total: int
    params_nonzero: int
    other: dict[str, Any] = field(default_factory=dict)

    @property
    def weights(self) -> int:
        return sum(r.weights for r in self.rows)

    @property
    def nonzero(self) -> int:
        return sum(r.nonzero for r in self.rows)

    @property
    def compression(self) -> float:
        """Dense / remaining weights of the reported layers."""
        return self.weights / max(self.nonzero, 1)

    @property
    def params_compression(self) -> float:
        """Dense / nonzero over all parameters (biases and unpruned layers too), as Han et al.'s Table 1 counts."""
        return self.params_total / max(self.params_nonzero, 1)

    @property
    def flops(self) -> int | None:
        values = [r.flops for r in self.rows]
        return None if any(v is None for v in values) else sum(values)

    @property
    def remaining_flops(self) -> int | None:
        values = [r.remaining_flops for r in self.rows]
        return None if any(v is None for v in values) else sum(values)

    def as_dict(self) -> dict[str, Any]:
        layers = []
        for row in self.rows:
            entry = asdict(row)
            entry.update(density=row.density, remaining_flops=row.remaining_flops)
            layers.append(entry)
        return {
            "layers": layers,
            "total": {"weights": self.weights, "nonzero": self.nonzero, "density": self.nonzero / max(self.weights, 1),
                      "flops": self.flops, "remaining_flops": self.remaining_flops},
            "compression": self.compression,
            "params_total": self.params_total,
            "params_nonzero": self.params_nonzero,
            "params_compression": self.params_compression,
        }

    def to_text(self) -> str:
        header = ["layer", "weights", "nonzero", "% kept", "FLOP", "FLOP left", "% FLOP kept"]
        lines = []
        for row in self.rows:
            lines.append([row.layer, _count(row.weights), _count(row.nonzero), f"{100 * row.density:.1f}%",
                          _count(row.flops), _count(row.remaining_flops), _percent(row.remaining_flops, row.flops)])
        lines.append(["total", _count(self.weights), _count(self.nonzero),
                      f"{100 * self.nonzero / max(self.weights, 1):.1f}%", _count(self.flops),
                      _count(self.remaining_flops), _percent(self.remaining_flops, self.flops)])
        widths = [max(len(str(x)) for x in column) for column in zip(header, *lines, strict=True)]

        def fmt(cells: list[str]) -> str:
            return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

        out = [fmt(header), fmt(["-" * w for w in widths])]
        out += [fmt(line) for line in lines]
        out.append(f"weights: {self.weights:,} -> {self.nonzero:,} ({self.compression:.1f}x); all parameters: "
                   f"{self.params_total:,} -> {self.params_nonzero:,} ({self.params_compression:.1f}x)")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.to_text()


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _percent(part: int | None, whole: int | None) -> str:
    return "-" if part is None or not whole else f"{100 * part / whole:.1f}%"


def sparsity_report(
    model: nn.Module,
    example_input: Tensor | tuple[Tensor, ...] | None = None,
    *,
    layer_types: tuple[type[nn.Module], ...] = DEFAULT_LAYER_TYPES,
    layers: Iterable[str] | None = None,
) -> SparsityReport:
    """Count weights, nonzeros and FLOPs of each Linear/Conv layer from the model itself.

    FLOPs (2 x multiply-adds per sample, as Han et al. count) need ``example_input``, a batch (first dimension
    the batch) the model accepts, to know conv output sizes; without it the FLOP columns read ``-``. Nonzeros
    are counted in the weights, so the report is the truth whatever pruned them.
    """
    wanted = None if layers is None else set(layers)
    modules = {name: m for name, m in model.named_modules()
               if isinstance(m, layer_types) and (wanted is None or name in wanted)
               and isinstance(getattr(m, "weight", None), Tensor)}
    if wanted is not None and wanted - set(modules):
        raise ValueError(f"layers: unknown {sorted(wanted - set(modules))}; allowed: {sorted(modules)}")
    flops = _layer_flops(model, modules, example_input) if example_input is not None else {}
    rows = [LayerRow(layer=name, kind=type(m).__name__, weights=m.weight.numel(),
                     nonzero=int(m.weight.count_nonzero()), flops=flops.get(name)) for name, m in modules.items()]
    params = list(model.parameters())
    return SparsityReport(rows=rows, params_total=sum(p.numel() for p in params),
                          params_nonzero=sum(int(p.count_nonzero()) for p in params))


def _layer_flops(model: nn.Module, modules: dict[str, nn.Module], example_input: Any) -> dict[str, int]:
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    batch = inputs[0].shape[0]
    flops: dict[str, int] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            if isinstance(module, nn.Linear):
                # each weight is one multiply-add per input row
                macs = module.weight.numel() * (output.numel() // module.out_features)
            else:
                # each conv output element takes in_channels/groups x prod(kernel) multiply-adds
                macs = module.weight[0].numel() * output.numel()
            flops[name] = flops.get(name, 0) + 2 * macs // batch
        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in modules.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return flops

