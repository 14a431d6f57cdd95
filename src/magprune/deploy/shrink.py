"""Shrink room: drop dead neurons and channels of a pruned model, giving a smaller dense model of ordinary layers.

A unit (a Linear's output feature, a Conv2d's output channel) is dead when all its outgoing connections are pruned
(nothing reads it) or all its incoming ones are (it emits the constant act(bias)). Constant units are folded into
the next layer's bias before they are removed. Works on chains of Linear/Conv2d layers joined by elementwise
activations, max-pooling, dropout and flatten, as written in ``nn.Sequential`` or any forward that torch.fx traces.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

_LAYERS = (nn.Linear, nn.Conv2d)
# ops that map a constant channel to a constant channel (elementwise, pooling of a constant, eval-mode dropout)
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.Identity)
_PASS_MODULES = (nn.MaxPool2d, nn.Dropout, nn.Flatten)
_ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, torch.tanh, torch.sigmoid, F.gelu, F.silu, F.leaky_relu}
_PASS_FUNCTIONS = {torch.flatten, F.dropout, F.max_pool2d}
_ELEMENTWISE_METHODS = {"relu", "tanh", "sigmoid"}
_PASS_METHODS = {"flatten", "contiguous"}


class ShrinkError(ValueError):
    """The model's graph is not one shrink knows how to rewrite."""


@dataclass
class _Link:
    """Layer ``source`` feeds layer ``target`` through ``ops`` (callables applied to a constant tensor)."""

    source: str
    target: str
    ops: list = field(default_factory=list)


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as error:
        raise ShrinkError(f"shrink needs a model torch.fx can trace; tracing {type(model).__name__} failed: "
                          f"{error}") from error


def _chain(model: nn.Module) -> list[_Link]:
    """The prunable layers in order, with the constant-preserving ops between consecutive ones."""
    graph = _trace(model)
    modules = dict(graph.named_modules())
    links: list[_Link] = []
    previous: str | None = None
    ops: list = []
    for node in graph.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        tensor_inputs = [a for a in node.all_input_nodes]
        if len(tensor_inputs) != 1 or len(node.users) != 1:
            raise ShrinkError(f"shrink supports a single chain of layers; node {node.name!r} ({node.op} {node.target})"
                              f" has {len(tensor_inputs)} inputs and {len(node.users)} users")
        if node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, _LAYERS):
                if isinstance(module, nn.Conv2d) and module.groups != 1:
                    raise ShrinkError(f"{node.target}: grouped convolutions are not supported")
                if previous is not None:
                    links.append(_Link(previous, node.target, ops))
                previous, ops = node.target, []
                continue
            if isinstance(module, _ELEMENTWISE_MODULES):
                ops.append(module)
                continue
            if isinstance(module, _PASS_MODULES):
                continue
        elif node.op == "call_function":
            if node.target in _ELEMENTWISE_FUNCTIONS:
                ops.append(node.target)
                continue
            if node.target in _PASS_FUNCTIONS:
                continue
        elif node.op == "call_method":
            if node.target in _ELEMENTWISE_METHODS:
                ops.append(lambda t, m=node.target: getattr(t, m)())
                continue
            if node.target in _PASS_METHODS:
                continue
        raise ShrinkError(f"shrink does not know how node {node.name!r} ({node.op} {node.target}) treats a "
                          "constant channel; supported between layers: elementwise activations, MaxPool2d, "
                          "Dropout, Flatten")
    return links


def _has_inputs(weight: Tensor) -> Tensor:
    """Per output unit: does any incoming weight remain?"""
    return weight.reshape(weight.shape[0], -1).ne(0).any(dim=1)


def _columns(weight: Tensor, n_units: int, unit_mask: Tensor) -> Tensor:
    """Mask over ``module``'s input features/channels for the given units of the previous layer."""
    in_size = weight.shape[1]
    if in_size % n_units:
        raise ShrinkError(f"{in_size} inputs cannot come from {n_units} units of the previous layer")
    return unit_mask.repeat_interleave(in_size // n_units)  # flatten keeps a channel's positions contiguous


def shrink(model: nn.Module) -> nn.Module:
    """A smaller dense copy of a pruned model with its dead units removed; its outputs equal the model's.

    The model must be a chain of ``nn.Linear``/``nn.Conv2d`` layers (first layer's inputs and last layer's outputs
    are kept). Conv layers with zero padding keep constant input channels whose constant is nonzero, since padding
    makes their contribution position-dependent. Forward code with hard-coded sizes (``x.view(-1, 800)``) will not
    fit the shrunk layers; use ``flatten``.
    """
    model = copy.deepcopy(model).eval()
    links = _chain(model)
    if not links:
        return model
    layers = {name: model.get_submodule(name) for link in links for name in (link.source, link.target)}
    weights = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    biases = {name: (layer.bias.detach().clone() if layer.bias is not None
                     else torch.zeros(layer.weight.shape[0])) for name, layer in layers.items()}
    alive = {name: torch.ones(w.shape[0], dtype=torch.bool) for name, w in weights.items()}
    changed = True
    while changed:
        changed = False
        for link in links:
            src, dst = link.source, link.target
            w_dst = weights[dst]
            n_units = weights[src].shape[0]
            per_unit_cols = w_dst.shape[1] // n_units
            col_live = w_dst.transpose(0, 1).reshape(n_units, per_unit_cols, -1).ne(0).any(dim=(1, 2))
            no_inputs = alive[src] & ~_has_inputs(weights[src])
            no_outputs = alive[src] & ~col_live
            for unit in torch.nonzero(no_inputs & ~no_outputs).flatten().tolist():
                constant = biases[src][unit].reshape(1)
                for op in link.ops:
                    constant = op(constant)
                constant = float(constant)
                target = layers[dst]
                if constant != 0.0 and isinstance(target, nn.Conv2d) and any(p != 0 for p in target.padding):
                    continue
                cols = slice(unit * per_unit_cols, (unit + 1) * per_unit_cols)
                block = w_dst[:, cols]
                biases[dst] += constant * block.reshape(block.shape[0], -1).sum(dim=1)
                w_dst[:, cols] = 0
                alive[src][unit] = False
                changed = True
            for unit in torch.nonzero(no_outputs).flatten().tolist():
                alive[src][unit] = False
                weights[src][unit] = 0
                changed = True
    # a layer's input mask follows from the previous layer's alive units
    inputs = {link.target: _columns(weights[link.target], weights[link.source].shape[0],
                                    alive[link.source]) for link in links}
    last = links[-1].target
    alive[last] = torch.ones(weights[last].shape[0], dtype=torch.bool)
    for name, layer in layers.items():
        keep_out = alive[name]
        keep_in = inputs.get(name, torch.ones(weights[name].shape[1], dtype=torch.bool))
        weight = weights[name][keep_out][:, keep_in]
        bias = biases[name][keep_out]
        if isinstance(layer, nn.Linear):
            new: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None or bool(
                bias.ne(0).any()))
        else:
            new = nn.Conv2d(weight.shape[1], weight.shape[0], layer.kernel_size, layer.stride, layer.padding,
                            layer.dilation, bias=layer.bias is not None or bool(bias.ne(0).any()),
                            padding_mode=layer.padding_mode)
        new = new.to(dtype=layer.weight.dtype, device=layer.weight.device)
        with torch.no_grad():
            new.weight.copy_(weight)
            if new.bias is not None:
                new.bias.copy_(bias)
        model.set_submodule(name, new)
    return model


def resize_to(model: nn.Module, state_dict: dict[str, Tensor]) -> nn.Module:
    """Replace the Linear/Conv2d layers of ``model`` whose weight shapes differ from ``state_dict``'s by layers of
    the stored shapes (how a shrunk model is rebuilt from its registry architecture), then load the state_dict."""
    for name, module in list(model.named_modules()):
        weight = state_dict.get(f"{name}.weight")
        if weight is None or not isinstance(module, _LAYERS) or tuple(weight.shape) == tuple(module.weight.shape):
            continue
        has_bias = f"{name}.bias" in state_dict
        if isinstance(module, nn.Linear):
            new: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
        else:
            new = nn.Conv2d(weight.shape[1], weight.shape[0], module.kernel_size, module.stride, module.padding,
                            module.dilation, bias=has_bias, padding_mode=module.padding_mode)
        model.set_submodule(name, new)
    model.load_state_dict(state_dict, strict=True)
    return model
