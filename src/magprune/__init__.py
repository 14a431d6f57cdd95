"""magprune: Han et al. (2015) magnitude pruning for PyTorch — prune, retrain, and keep pruned weights at zero.

The core (this package's top-level modules) is what a training loop needs; :mod:`magprune.deploy` turns zeros into
size and speed, :mod:`magprune.analysis` measures sensitivity and trade-offs, :mod:`magprune.experiment` is the
reproducible run around it all, :mod:`magprune.kernels` the compiled code under the core and deploy.
"""

from magprune.criteria import GlobalSparsity, LayerSparsity, StdThreshold, han2015
from magprune.deploy import load_compressed, load_compressed_into, save_compressed, shrink, sparsify
from magprune.models import create_model, list_models, register_model
from magprune.pruner import OptimizerHandle, Pruner, PruningInvariantError
from magprune.report import SparsityReport, sparsity_report
from magprune.retrain import DropoutRescaler, add_penalty_gradient, freeze, rescaled_dropout, weight_penalty
from magprune.schedules import GradualCubic, Iterative, OneShot, PruningSchedule
from magprune.sparse_training import SparseCompute, sparse_compute
from magprune.targets import DEFAULT_LAYER_TYPES, register_layer_type

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_LAYER_TYPES",
    "DropoutRescaler",
    "GlobalSparsity",
    "GradualCubic",
    "Iterative",
    "LayerSparsity",
    "OneShot",
    "OptimizerHandle",
    "Pruner",
    "PruningInvariantError",
    "PruningSchedule",
    "SparseCompute",
    "SparsityReport",
    "StdThreshold",
    "__version__",
    "add_penalty_gradient",
    "create_model",
    "freeze",
    "han2015",
    "list_models",
    "load_compressed",
    "load_compressed_into",
    "register_layer_type",
    "register_model",
    "rescaled_dropout",
    "save_compressed",
    "shrink",
    "sparse_compute",
    "sparsify",
    "sparsity_report",
    "weight_penalty",
]
