"""Core room (targets): which parameters of a model are pruned: the layer-type registry, names and glob patterns."""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Iterable

from torch import nn

LayerType = type[nn.Module] | str

# Layer type -> its weight matrices: names (or glob patterns) of the module's own parameters. A type given as a string
# is a glob matched against "module.QualName" of each class in the module's MRO, so a library's layer is recognised
# without importing that library.
LAYER_WEIGHTS: dict[LayerType, tuple[str, ...]] = {}


def register_layer_type(layer_type: LayerType, weights: Iterable[str] = ("weight",)) -> None:
    """Target the modules of ``layer_type`` by default, and prune these of their own parameters as weights.

    ``layer_type`` is a class (subclasses included) or a glob over ``"module.QualName"`` of a class, e.g.
    ``"transformers.*Conv1D"``; ``weights`` are the names or glob patterns of its weight parameters
    (``("weight_ih_l*", "weight_hh_l*")`` for an RNN). Registering a type again replaces its weights.
    """
    if not (isinstance(layer_type, str) and layer_type) and not (
            isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(f"layer_type must be an nn.Module subclass or a class-name pattern, got {layer_type!r}")
    weights = tuple(weights)
    if not weights or not all(isinstance(w, str) and w for w in weights):
        raise ValueError(f"weights must name at least one parameter of {layer_type!r}, got {weights!r}")
    LAYER_WEIGHTS[layer_type] = weights


for _type in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_layer_type(_type)
register_layer_type(nn.MultiheadAttention, ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"))
register_layer_type(nn.RNNBase, ("weight_ih_l*", "weight_hh_l*", "weight_hr_l*"))  # RNN, LSTM, GRU
register_layer_type("transformers.*Conv1D")  # GPT-2's linear layers (weight stored (in, out))

# The built-in default layer types (what the registry holds at import).
DEFAULT_LAYER_TYPES: tuple[LayerType, ...] = tuple(LAYER_WEIGHTS)


def _type_matches(module: nn.Module, layer_type: LayerType) -> bool:
    if isinstance(layer_type, type):
        return isinstance(module, layer_type)
    return any(fnmatch.fnmatchcase(f"{cls.__module__}.{cls.__qualname__}", layer_type)
               or fnmatch.fnmatchcase(cls.__qualname__, layer_type) for cls in type(module).__mro__)


def type_name(layer_type: LayerType) -> str:
    return layer_type.__name__ if isinstance(layer_type, type) else layer_type


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is ``transformers``' ``Conv1D`` (a linear layer with its weight stored (in, out))."""
    return _type_matches(module, "transformers.*Conv1D")


def layer_weights(module: nn.Module, layer_types: Iterable[LayerType] | None = None) -> list[str] | None:
    """Names of ``module``'s own parameters that are weight matrices, if it is of one of ``layer_types`` (default:
    every registered type); None if it is not. A type not in the registry has ``"weight"`` as its weight."""
    types = LAYER_WEIGHTS if layer_types is None else tuple(layer_types)
    matched = [t for t in types if _type_matches(module, t)]
    if not matched:
        return None
    patterns = {p for t in matched for p in LAYER_WEIGHTS.get(t, ())} or next(
        (set(w) for t, w in LAYER_WEIGHTS.items() if _type_matches(module, t)), {"weight"})
    own = [name for name, p in module.named_parameters(recurse=False) if p is not None]
    return [name for name in own if any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def _is_bias(local_name: str) -> bool:
    return "bias" in local_name  # bias, in_proj_bias, bias_ih_l0, bias_k


def select_parameters(
    model: nn.Module,
    targets: Iterable[str] | None,
    layer_types: Iterable[LayerType] | None = None,
    include_bias: bool = False,
) -> dict[str, nn.Parameter]:
    """Resolve module/parameter names or glob patterns to the parameters to prune, in model order.

    Without ``targets``: the weights of every module of ``layer_types`` (default: the registered types), except a
    weight tied to an ``nn.Embedding`` (an output layer sharing the input embedding), which is pruned only when
    named. A pattern selects the weights (and with ``include_bias`` the biases) of the matching modules of those
    types, or of the matching parameters of such modules; a parameter named exactly is selected whatever holds it.
    A parameter tied to others is one target, reachable by each of its names, and keyed by the first name that
    selected it.
    """
    layer_types = None if layer_types is None else tuple(layer_types)
    names_of: dict[int, list[str]] = {}
    all_params: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        all_params[name] = param
        names_of.setdefault(id(param), []).append(name)
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    modules = dict(model.named_modules(remove_duplicate=False))
    # every prunable parameter name of a targeted-type module -> is it a weight (False: a bias)
    prunable: dict[str, bool] = {}
    typed_modules: dict[str, list[str]] = {}
    for mod_name, module in modules.items():
        weights = layer_weights(module, layer_types)
        if weights is None:
            continue
        prefix = f"{mod_name}." if mod_name else ""
        chosen = [prefix + w for w in weights]
        prunable.update(dict.fromkeys(chosen, True))
        biases = [prefix + n for n, p in module.named_parameters(recurse=False)
                  if p is not None and _is_bias(n) and prefix + n not in prunable]
        if include_bias:
            prunable.update(dict.fromkeys(biases, False))
            chosen += biases
        typed_modules[mod_name] = chosen
    types_text = [type_name(t) for t in (LAYER_WEIGHTS if layer_types is None else layer_types)]
    chosen: list[str] = []
    if targets is None:
        tied_out = []
        for names in typed_modules.values():
            for name in names:
                (tied_out if id(all_params[name]) in embedded else chosen).append(name)
        if not chosen:
            found = Counter(type(m).__name__ for m in modules.values() if any(True for _ in m.parameters(False)))
            tied = f"; {tied_out[:3]} are tied to an Embedding: name them in targets=[...]" if tied_out else ""
            raise ValueError(f"model has no parameters of the layer types {types_text} to prune; its modules with "
                             f"parameters are {dict(found.most_common(12))}{tied}. Select a layer type with "
                             "layer_types=(...) or magprune.register_layer_type(cls, weights=(...)), or name "
                             "parameters with targets=[...]")
    else:
        for pattern in targets:
            matched = _match_pattern(pattern, typed_modules, prunable, all_params, embedded)
            if not matched:
                raise ValueError(_explain_no_match(pattern, modules, all_params, prunable, types_text, include_bias))
            chosen += matched
        if not chosen:
            raise ValueError("targets is empty: name at least one module or parameter to prune")
    # keyed by the name that selected it first ("lm_head" selects a tied embedding as "lm_head.weight"), in model order
    key_of: dict[int, str] = {}
    for name in chosen:
        key_of.setdefault(id(all_params[name]), name)
    selected: dict[str, nn.Parameter] = {}
    for param in all_params.values():
        key = key_of.pop(id(param), None)
        if key is not None:
            selected[key] = param
    return selected


def _match_pattern(pattern: str, typed_modules: dict[str, list[str]], prunable: dict[str, bool],
                   all_params: dict[str, nn.Parameter], embedded: set[int]) -> list[str]:
    if pattern in all_params:  # a parameter named exactly: whatever it is
        return [pattern]
    matched = []
    for mod_name, names in typed_modules.items():
        if mod_name and fnmatch.fnmatchcase(mod_name, pattern):
            # a weight tied to an embedding only when its module is named exactly
            matched += [n for n in names if mod_name == pattern or id(all_params[n]) not in embedded]
    if not matched:
        matched = [n for n in prunable if fnmatch.fnmatchcase(n, pattern) and id(all_params[n]) not in embedded]
    return matched


def _explain_no_match(pattern: str, modules: dict[str, nn.Module], all_params: dict[str, nn.Parameter],
                      prunable: dict[str, bool], types_text: list[str], include_bias: bool) -> str:
    untyped = [f"{name} ({type(m).__name__})" for name, m in modules.items()
               if name and fnmatch.fnmatchcase(name, pattern) and any(True for _ in m.parameters(False))]
    params = [n for n in all_params if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(module_name(n), pattern)]
    if untyped or params:
        biases = [n for n in params if _is_bias(n.rsplit(".", 1)[-1])]
        hint = "; pass include_bias=True to prune biases" if biases and not include_bias else ""
        return (f"targets: {pattern!r} matches no weight of a module of the layer types {types_text}: it matches "
                f"modules {untyped[:8]} and parameters {params[:8]}{hint}. Name a parameter exactly (e.g. "
                f"{(params or ['layer.weight'])[0]!r}), or add its layer type with layer_types=(...) or "
                "magprune.register_layer_type(cls, weights=(...))")
    available = sorted(n for n in modules if n) + sorted(all_params)
    return (f"targets: {pattern!r} matches no module or parameter of the model; "
            f"available: {available[:40]}{' ...' if len(available) > 40 else ''}")


def module_name(param_name: str) -> str:
    """The module that holds a parameter: ``"fc1.weight"`` and ``"fc1.bias"`` -> ``"fc1"``; a parameter of the
    root module (no dot) is its own name."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name
