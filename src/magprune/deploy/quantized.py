"""Deploy room (shared-weight inference): ``QuantizedLinear`` runs a Linear layer straight from its codebook indices
(:mod:`magprune.kernels.quantized`), and :func:`load_quantized` builds a model from a compressed file with them."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor, nn

from magprune.deploy.entropy import SharedWeight, shared_values
from magprune.deploy.format import CompressedFormatError, as_numpy, load_compressed
from magprune.deploy.modules import OneExample, batched_product
from magprune.kernels.quantized import QuantizedProduct


class QuantizedLinear(nn.Module):
    """Inference replacement for ``nn.Linear`` whose nonzero weights take at most 256 shared values (after
    :class:`~magprune.deploy.quantize.WeightSharing`), held as codebook indices, never as fp32 weights.

    Batch 1 (the case it is for: the time is the bytes read) runs the matrix-vector kernel; a batch runs the
    batched one over the batch transposed (until 2026-12-07 the matrix-vector kernel once per example, slower than
    dense torch at batch 32). float32 CPU inputs, no autograd."""

    def __init__(self, weight: SharedWeight, bias: Tensor | None) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"QuantizedLinear wants a 2-D weight, got shape {list(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        rows, cols = np.divmod(weight.positions, self.in_features)
        codebook = weight.codebook if weight.codebook.size else np.zeros(1, dtype=np.float32)
        self.product = QuantizedProduct(rows, cols, weight.indices, codebook, self.out_features, self.in_features)
        self.bias_array = as_numpy(bias.float()).copy() if bias is not None else \
            np.zeros(self.out_features, dtype=np.float32)
        self.has_bias = bias is not None
        self._one: OneExample | None = None  # the one-example path, set up on the first batch-1 call

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantizedLinear:
        """From an ``nn.Linear`` whose nonzero weights take at most 256 distinct values."""
        found = shared_values(as_numpy(linear.weight.detach().float()))
        if found is None:
            raise ValueError("QuantizedLinear.from_linear: the weight has more than 256 distinct nonzero values; "
                             "share them first (magprune.deploy.quantize.WeightSharing)")
        positions, codebook, indices = found
        return cls(SharedWeight(tuple(linear.weight.shape), positions, codebook, indices),
                   linear.bias.detach() if linear.bias is not None else None)

    def forward(self, x: Tensor) -> Tensor:
        # One example, contiguous, on the AVX-512 kernel (which reads x in place): torch.empty and the plan, whose
        # kernel writes bias + W x (few calls before the kernel: each costs tens of microseconds when the cache is
        # cold, see SparseLinear.forward)
        one = self._one
        if one is not None and not x.requires_grad and x.dtype is torch.float32 and x.is_cpu and x.is_contiguous():
            shape = one.shapes.get(x.shape)
            if shape is not None and self.bias_array is one.bias:
                out = torch.empty(shape, dtype=torch.float32)
                self.product.matvec_plan(torch.get_num_threads()).run(x.data_ptr(), out.data_ptr(), one.start)
                return out
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or not x.is_cpu:
            raise TypeError(f"QuantizedLinear runs on float32 CPU tensors, got {x.dtype} on {x.device}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantizedLinear expects last dim {self.in_features}, got shape {list(x.shape)}")
        lead = x.shape[:-1]
        rows = x.detach().reshape(-1, self.in_features).numpy()
        if rows.shape[0] != 1:  # the batch transposed, each group of the product then reads rows of it
            y = batched_product(self.product, self.bias_array, rows, zero_row=True,
                                widest=self.product.batch_columns())
            return torch.from_numpy(np.ascontiguousarray(y).reshape(*lead, self.out_features))
        bias = self.bias_array
        if self.product.reads_x_in_place and bias.shape == (self.out_features,) and bias.dtype == np.float32 \
                and bias.flags.c_contiguous:  # the next such call's path
            self._one = OneExample(self.in_features, self.out_features, bias, bias.ctypes.data)
        out = bias.copy()
        self.product.matvec(rows[0], out, torch.get_num_threads())
        return torch.from_numpy(out.reshape(*lead, self.out_features))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_one"] = None  # addresses of this object's arrays
        return state

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.product.nnz}, "
                f"values={self.product.k}, bias={self.has_bias}")


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a compressed file into ``model`` for inference: every ``nn.Linear`` whose weight the file holds in the
    ``shared`` encoding becomes a :class:`QuantizedLinear` built from the stored indices (no fp32 weight is made);
    everything else is loaded as usual. Returns the model, in eval mode."""
    state = load_compressed(path, expand_shared=False)
    shared = {name: value for name, value in state.items() if isinstance(value, SharedWeight)}
    replace = {}
    for module_name, module in model.named_modules():
        key = f"{module_name}.weight" if module_name else "weight"
        if isinstance(module, nn.Linear) and key in shared:
            if tuple(module.weight.shape) != shared[key].shape:
                raise CompressedFormatError(f"{path}: {key}: file has shape {list(shared[key].shape)}, "
                                            f"{type(model).__name__} expects {list(module.weight.shape)}")
            bias_key = f"{module_name}.bias" if module_name else "bias"
            replace[module_name] = QuantizedLinear(shared[key], state.get(bias_key))
    plain = {k: torch.from_numpy(v.dense()) if isinstance(v, SharedWeight) else v for k, v in state.items()
             if not any(k.startswith(f"{m}.") or (not m and k in ("weight", "bias")) for m in replace)}
    own = model.state_dict()
    missing = sorted(k for k in own if k not in plain and not any(k.startswith(f"{m}.") for m in replace))
    if missing or set(plain) - set(own):
        raise CompressedFormatError(f"{path}: does not fit {type(model).__name__}: missing {missing}, unexpected "
                                    f"{sorted(set(plain) - set(own))}")
    model.load_state_dict(plain, strict=False)
    for module_name, layer in replace.items():
        if module_name:
            parent, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
        else:
            model = layer
    return model.eval()
