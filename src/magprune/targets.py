"""Core room (targets): which parameters of a model are pruned, from layer types, names and glob patterns."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn

DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def select_parameters(
    model: nn.Module,
    targets: Iterable[str] | None,
    layer_types: tuple[type[nn.Module], ...] = DEFAULT_LAYER_TYPES,
    include_bias: bool = False,
) -> dict[str, nn.Parameter]:
    """Resolve module/parameter names or glob patterns to the parameters to prune, in model order."""
    all_params = dict(model.named_parameters())
    by_module: dict[str, list[str]] = {}
    for module_name, module in model.named_modules():
        names = []
        for attr in ("weight", "bias") if include_bias else ("weight",):
            full = f"{module_name}.{attr}" if module_name else attr
            if isinstance(getattr(module, attr, None), nn.Parameter) and full in all_params:
                names.append(full)
        if names:
            by_module[module_name] = names
    typed = {name for module_name, module in model.named_modules() if isinstance(module, layer_types)
             for name in by_module.get(module_name, [])}
    if targets is None:
        chosen = typed
        if not chosen:
            raise ValueError(f"model has no parameters of the layer types {[t.__name__ for t in layer_types]} to "
                             "prune; name them with targets=[...]")
    else:
        chosen = set()
        for pattern in targets:
            # A pattern naming modules selects their weights; only a pattern that names no module is matched
            # against parameter names, so "fc*" means the fc layers' weights, not also their biases.
            matched = {n for module_name, names in by_module.items()
                       if module_name and fnmatch.fnmatchcase(module_name, pattern) for n in names}
            if not matched:
                matched = {n for n in all_params if fnmatch.fnmatchcase(n, pattern)}
            if not matched:
                available = sorted(m for m in by_module if m) + sorted(all_params)
                raise ValueError(f"targets: {pattern!r} matches no module or parameter of the model; "
                                 f"available: {available[:40]}{' ...' if len(available) > 40 else ''}")
            chosen.update(matched)
        if not chosen:
            raise ValueError("targets is empty: name at least one module or parameter to prune")
    return {name: p for name, p in all_params.items() if name in chosen}


def module_name(param_name: str) -> str:
    """The module that holds a parameter: ``"fc1.weight"`` and ``"fc1.bias"`` -> ``"fc1"``; a parameter of the
    root module (no dot) is its own name."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name

