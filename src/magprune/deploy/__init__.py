"""Deploy wing: turn a pruned model's zeros into size and speed.

Rooms: :mod:`.shrink` (drop dead neurons and channels: a smaller dense model), :mod:`.format` (the compressed file
format), :mod:`.modules` (sparse inference modules), :mod:`.sparsify` (convert layers where measured faster),
:mod:`.bench` (dense vs sparse latency). May import the core and the kernels, never the experiment.
"""

from magprune.deploy.bench import bench_model, format_bench
from magprune.deploy.format import (
    CompressedFormatError,
    format_size_report,
    load_compressed,
    load_compressed_into,
    save_compressed,
    size_report,
    size_report_from_params,
)
from magprune.deploy.modules import SparseConv2d, SparseLinear
from magprune.deploy.shrink import ShrinkError, resize_to, shrink
from magprune.deploy.sparsify import SparsifyDecision, format_decisions, sparsify

__all__ = [
    "CompressedFormatError",
    "ShrinkError",
    "SparseConv2d",
    "SparseLinear",
    "SparsifyDecision",
    "bench_model",
    "format_bench",
    "format_decisions",
    "format_size_report",
    "load_compressed",
    "load_compressed_into",
    "resize_to",
    "save_compressed",
    "shrink",
    "size_report",
    "size_report_from_params",
    "sparsify",
]
