"""Report room: per-layer weights, nonzeros, FLOPs and the compression ratio of a (pruned) model, as text or dict."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from magprune.targets import LayerType, is_hf_conv1d, module_name, select_parameters


@dataclass
class LayerRow:
    layer: str
    kind: str
    weights: int
    nonzero: int
    flops: int | None = None  # dense FLOPs per sample, 2 x multiply-adds (Han et al.'s convention)
    input_density: float | None = None  # nonzero fraction of the layer's input activations (activation_density)

    @property
    def density(self) -> float:
        return self.nonzero / self.weights if self.weights else 1.0

    @property
    def remaining_flops(self) -> int | None:
        # Every weight of a layer is used the same number of times per sample, so FLOPs scale with its density.
        return None if self.flops is None else round(self.flops * self.density)

    @property
    def han_flops(self) -> int | None:
        """FLOPs left as Han et al.'s Tables 2-3 count them: weights kept x density of the layer's input."""
        if self.flops is None or self.input_density is None:
            return None
        return round(self.flops * self.density * self.input_density)


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

    @property
    def han_flops(self) -> int | None:
        values = [r.han_flops for r in self.rows]
        return None if not values or any(v is None for v in values) else sum(values)

    def with_input_density(self, densities: dict[str, float]) -> SparsityReport:
        """A copy whose rows carry ``densities`` (from :func:`activation_density`), for the Han FLOP column."""
        rows = [replace(r, input_density=densities.get(r.layer, r.input_density)) for r in self.rows]
        return replace(self, rows=rows)

    def as_dict(self) -> dict[str, Any]:
        layers = []
        for row in self.rows:
            entry = asdict(row)
            entry.update(density=row.density, remaining_flops=row.remaining_flops, han_flops=row.han_flops)
            layers.append(entry)
        return {
            "layers": layers,
            "total": {"weights": self.weights, "nonzero": self.nonzero, "density": self.nonzero / max(self.weights, 1),
                      "flops": self.flops, "remaining_flops": self.remaining_flops, "han_flops": self.han_flops},
            "compression": self.compression,
            "params_total": self.params_total,
            "params_nonzero": self.params_nonzero,
            "params_compression": self.params_compression,
        }

    def to_text(self) -> str:
        han = any(r.input_density is not None for r in self.rows)
        header = ["layer", "weights", "nonzero", "% kept", "FLOP", "FLOP left", "% FLOP kept"]
        header += ["input density", "% FLOP kept (Han)"] if han else []
        lines = []
        for row in self.rows:
            lines.append([row.layer, _count(row.weights), _count(row.nonzero), f"{100 * row.density:.1f}%",
                          _count(row.flops), _count(row.remaining_flops), _percent(row.remaining_flops, row.flops)]
                         + ([_fraction(row.input_density), _percent(row.han_flops, row.flops)] if han else []))
        lines.append(["total", _count(self.weights), _count(self.nonzero),
                      f"{100 * self.nonzero / max(self.weights, 1):.1f}%", _count(self.flops),
                      _count(self.remaining_flops), _percent(self.remaining_flops, self.flops)]
                     + (["", _percent(self.han_flops, self.flops)] if han else []))
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


def forward_example(model: nn.Module, example_input: Any) -> Any:
    """Call ``model`` on an example input: a tensor, a tuple of positional arguments, or a mapping of keyword
    arguments (what a Hugging Face tokenizer returns)."""
    if isinstance(example_input, Mapping):
        return model(**example_input)
    if isinstance(example_input, tuple | list):
        return model(*example_input)
    return model(example_input)


def example_batch_size(example_input: Any) -> int:
    """The batch size of an example input: the first dimension of its first tensor."""
    values = example_input.values() if isinstance(example_input, Mapping) else (
        example_input if isinstance(example_input, tuple | list) else (example_input,))
    for value in values:
        if isinstance(value, Tensor) and value.dim():
            return value.shape[0]
    raise ValueError(f"example_input holds no tensor with a batch dimension: {type(example_input).__name__}")


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def sparsity_report(
    model: nn.Module,
    example_input: Tensor | tuple[Tensor, ...] | Mapping[str, Tensor] | None = None,
    *,
    layer_types: Iterable[LayerType] | None = None,
    layers: Iterable[str] | None = None,
) -> SparsityReport:
    """Count weights, nonzeros and FLOPs of each layer whose weights :class:`~magprune.Pruner` targets by default
    (every type of the layer-type registry, see :func:`magprune.register_layer_type`), from the model itself.

    FLOPs (2 x multiply-adds per sample by the layer's weights, as Han et al. count) need ``example_input``, a
    batch the model accepts (a tensor, a tuple of arguments or a dict of keyword arguments, first dimension the
    batch), to know output sizes and sequence lengths; without it the FLOP columns read ``-``. Nonzeros are
    counted in the weights, so the report is the truth whatever pruned them.
    """
    try:
        selected = select_parameters(model, None, layer_types)
    except ValueError:  # no layer of the registered types: nothing to report per layer
        selected = {}
    grouped: dict[str, list[Tensor]] = {}
    for name, param in selected.items():
        grouped.setdefault(module_name(name) if "." in name else "", []).append(param)
    if layers is not None:
        wanted = set(layers)
        if wanted - set(grouped):
            raise ValueError(f"layers: unknown {sorted(wanted - set(grouped))}; allowed: {sorted(grouped)}")
        grouped = {name: ps for name, ps in grouped.items() if name in wanted}
    modules = {name: model.get_submodule(name) for name in grouped}
    flops = _layer_flops(model, modules, example_input) if example_input is not None else {}
    rows = [LayerRow(layer=name, kind=type(modules[name]).__name__, weights=sum(p.numel() for p in params),
                     nonzero=sum(int(p.count_nonzero()) for p in params), flops=flops.get(name))
            for name, params in grouped.items()]
    params = list(model.parameters())
    return SparsityReport(rows=rows, params_total=sum(p.numel() for p in params),
                          params_nonzero=sum(int(p.count_nonzero()) for p in params))


def _weight_macs(module: nn.Module, args: tuple, output: Any) -> dict[str, int]:
    """Multiply-adds by ``module``'s weights in one call (for its own row, and for MultiheadAttention's out_proj,
    whose weight it uses without calling it)."""
    if isinstance(module, nn.Linear):  # each weight is one multiply-add per input row (token)
        return {"": module.weight.numel() * (output.numel() // module.out_features)}
    if is_hf_conv1d(module):  # transformers' Conv1D: weight (in, out)
        return {"": module.weight.numel() * (output.numel() // module.weight.shape[1])}
    if isinstance(module, nn.modules.conv._ConvTransposeNd):  # each input element meets in_channels' slice once
        return {"": module.weight[0].numel() * args[0].numel()}
    if isinstance(module, nn.modules.conv._ConvNd):  # each output element: in_channels/groups x prod(kernel)
        return {"": module.weight[0].numel() * output.numel()}
    if isinstance(module, nn.MultiheadAttention):
        query, key, value = args[:3]
        tokens = [t.numel() // t.shape[-1] for t in (query, key, value)]
        if module.in_proj_weight is not None:
            e = module.embed_dim
            macs = sum(module.in_proj_weight[i * e:(i + 1) * e].numel() * n for i, n in enumerate(tokens))
        else:
            macs = sum(w.numel() * n for w, n in zip(
                (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight), tokens, strict=True))
        return {"": macs, "out_proj": module.out_proj.weight.numel() * tokens[0]}
    if isinstance(module, nn.RNNBase):  # every weight matrix once per time step of every sequence
        x = args[0]
        steps = x.data.shape[0] if isinstance(x, nn.utils.rnn.PackedSequence) else x.numel() // module.input_size
        weights = sum(getattr(module, n).numel() for n, _ in module.named_parameters(recurse=False)
                      if n.startswith("weight"))
        return {"": weights * steps}
    weight = getattr(module, "weight", None)  # a registered type of unknown arithmetic: one use per output row
    if isinstance(weight, Tensor) and isinstance(output, Tensor) and weight.dim() >= 2:
        return {"": weight.numel() * (output.numel() // weight.shape[0])}
    return {}


def _layer_flops(model: nn.Module, modules: dict[str, nn.Module], example_input: Any) -> dict[str, int]:
    batch = example_batch_size(example_input)
    flops: dict[str, int] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            for suffix, macs in _weight_macs(module, args, output).items():
                row = f"{name}.{suffix}" if suffix and name else (suffix or name)
                if row in modules:
                    flops[row] = flops.get(row, 0) + 2 * macs // batch
        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in modules.items()]
    # MultiheadAttention's module path, not the fused fast path that skips the submodules' hooks
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    was_training = model.training
    try:
        model.eval()
        if mha is not None:
            mha.set_fastpath_enabled(False)
        with torch.no_grad():
            forward_example(model, example_input)
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
        for h in handles:
            h.remove()
    return flops



def activation_density(model: nn.Module, inputs: Tensor, *, layers: Iterable[str] | None = None,
                       layer_types: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd),
                       batch_size: int = 1000, count_data_zeros: bool = False) -> dict[str, float]:
    """Nonzero fraction of each layer's input activations over ``inputs`` (a batch, e.g. the test set), by layer.

    The zeros come from ReLU and from neurons that pruning left without weights; Han et al. multiply a layer's
    weight density by this to get their "% FLOP kept" (Tables 2-3, see :attr:`LayerRow.han_flops`). A layer fed
    the data itself counts as dense unless ``count_data_zeros``: Han's tables do so (their first layer's FLOP
    column equals its weight column although MNIST pixels are mostly zero). Runs in eval mode, without gradients.
    """
    wanted = None if layers is None else set(layers)
    modules = {name: m for name, m in model.named_modules()
               if isinstance(m, layer_types) and (wanted is None or name in wanted)}
    if wanted is not None and wanted - set(modules):
        raise ValueError(f"layers: unknown {sorted(wanted - set(modules))}; allowed: {sorted(modules)}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    counts = {name: [0, 0] for name in modules}  # nonzero, total
    data_fed: set[str] = set()
    current: list[Tensor] = []

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if not count_data_zeros and x.untyped_storage().data_ptr() == current[0].untyped_storage().data_ptr():
                data_fed.add(name)  # a view of the batch itself (e.g. flattened pixels)
            counts[name][0] += int(x.count_nonzero())
            counts[name][1] += x.numel()
        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in modules.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for start in range(0, len(inputs), batch_size):
                current[:] = [inputs[start:start + batch_size].contiguous()]
                model(current[0])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {name: 1.0 if name in data_fed else nonzero / max(total, 1) for name, (nonzero, total) in counts.items()}
