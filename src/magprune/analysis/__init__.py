"""Analysis wing: how pruning affects a model, as data and figures (Han et al.'s Figs. 4-6).

Rooms: :mod:`.sensitivity` (each layer pruned alone over a grid), :mod:`.tradeoff` (accuracy loss against
sparsity for L1/L2, with and without retraining, iterative), :mod:`.plots` (the figures). Library functions that
take a model and an evaluation callable; may import the core, never the experiment.
"""

from magprune.analysis.sensitivity import SensitivityResult, sensitivity_scan
from magprune.analysis.tradeoff import tradeoff_curves

__all__ = ["SensitivityResult", "sensitivity_scan", "tradeoff_curves"]
