"""Plots room: the paper's figures as PNG files (sensitivity curves, accuracy-vs-parameters trade-off, weight
histograms). matplotlib is imported lazily, with the non-interactive Agg backend."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from magprune.analysis.sensitivity import SensitivityResult
from magprune.fileio import write_atomic

CONV_KINDS = ("Conv1d", "Conv2d", "Conv3d")


def _figure(**kwargs):
    """A matplotlib Figure drawn without pyplot: no backend is chosen and no global figure list is touched, so a
    caller's own matplotlib setup (an interactive backend, a notebook) is left as it was."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    write_atomic(path, buffer.getvalue())
    return path


def plot_sensitivity(result: SensitivityResult, path: str | os.PathLike, *, metric: str = "accuracy (%)",
                     title: str = "Sensitivity: each layer pruned alone, no retraining") -> Path:
    """Metric vs % of the layer's weights pruned, one curve per layer; conv and FC layers in separate panels
    (Han et al. Fig. 6)."""
    groups = {"CONV layers": [n for n, k in result.kinds.items() if k in CONV_KINDS],
              "FC layers": [n for n, k in result.kinds.items() if k not in CONV_KINDS]}
    groups = {name: layers for name, layers in groups.items() if layers}
    fig = _figure(figsize=(6 * len(groups), 4.5))
    axes = fig.subplots(1, len(groups), squeeze=False, sharey=True)
    x = [100 * s for s in result.sparsities]
    for ax, (group, layers) in zip(axes[0], groups.items(), strict=True):
        for layer in layers:
            ax.plot(x, [100 * m for m in result.curves[layer]], marker="o", markersize=3, label=layer)
        ax.axhline(100 * result.baseline, color="grey", linestyle=":", linewidth=1, label="dense")
        ax.set_title(group)
        ax.set_xlabel("parameters pruned away (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0][0].set_ylabel(metric)
    fig.suptitle(title)
    path = _save(fig, path)
    return path


def plot_tradeoff(curves: Mapping[str, Sequence[tuple[float, float]]], path: str | os.PathLike, *,
                  title: str = "Accuracy loss vs parameters pruned") -> Path:
    """Han et al. Fig. 5: accuracy loss (percentage points) vs % parameters pruned, one curve per recipe.

    ``curves`` maps a recipe label ("L2 reg w/ retrain", ...) to (fraction pruned, accuracy loss) points.
    """
    fig = _figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for label, points in curves.items():
        points = sorted(points)
        ax.plot([100 * p for p, _ in points], [100 * loss for _, loss in points], marker="o", markersize=3,
                label=label)
    ax.axhline(0.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("parameters pruned away (%)")
    ax.set_ylabel("accuracy loss (percentage points)")
    largest = max((100 * abs(loss) for points in curves.values() for _, loss in points), default=0.0)
    if largest > 5.0:
        # one collapsing curve (pruning without retraining) would flatten the others into a line at zero
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("symlog", linthresh=1.0)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.set_ylabel("accuracy loss (points; log scale beyond ±1)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    path = _save(fig, path)
    return path


def plot_frontier(curves: Mapping[str, Sequence[tuple[float, float]]], path: str | os.PathLike, *,
                  references: Sequence[tuple[str, float, float]] = (), dense: Sequence[float] = (),
                  title: str = "Test error vs compression") -> Path:
    """Iterative pruning's frontier: test error (%) vs compression (log scale), one curve per seed (``curves``:
    label -> (compression, error) points in pruning order), published results as labelled markers
    (``references``: (label, compression, error)) and the dense networks' errors as a band."""
    fig = _figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for label, points in curves.items():
        ax.plot([c for c, _ in points], [100 * e for _, e in points], marker="o", markersize=3, label=label)
    for (label, compression, error), marker in zip(references, "s^Dv", strict=False):
        ax.plot([compression], [100 * error], marker=marker, linestyle="none", color="black", markersize=7,
                markerfacecolor="none", label=f"{label}: {100 * error:.2f}% at {compression:g}x")
    if dense:
        ax.axhspan(100 * min(dense), 100 * max(dense), color="grey", alpha=0.2, label="dense (range over seeds)")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("compression (parameters / parameters kept, log scale)")
    ax.set_ylabel("test error (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small", loc="best")
    return _save(fig, path)


HISTOGRAM_SAMPLE = 1 << 20  # weights kept per layer and stage for the histograms


def sample_weights(params: Mapping[str, torch.Tensor], limit: int = HISTOGRAM_SAMPLE) -> dict[str, torch.Tensor]:
    """A CPU copy of every 1-in-k weight of each tensor, at most ``limit`` per tensor: what the histograms need,
    without a full copy of a VGG-16 (553 MB) per stage. Tensors up to ``limit`` are copied whole."""
    samples = {}
    for name, tensor in params.items():
        flat = tensor.detach().reshape(-1)
        stride = max(-(-flat.numel() // limit), 1)
        samples[name] = flat[::stride].cpu().clone()
    return samples


def plot_weight_histograms(stages: Mapping[str, Mapping[str, torch.Tensor]], path: str | os.PathLike, *,
                           bins: int = 101, title: str = "Weight distribution per layer",
                           sizes: Mapping[str, int] | None = None) -> Path:
    """One panel per layer, one histogram per stage (e.g. "dense", "pruned", "retrained"), zeros left out of
    pruned stages so the removed band near zero shows (Han et al. Fig. 7).

    ``sizes`` gives each layer's full number of weights when the stages hold samples (:func:`sample_weights`):
    counts are then scaled up to the whole layer and the legend's nonzero counts marked as estimates."""
    layers = list(next(iter(stages.values())))
    cols = min(len(layers), 4)
    rows = -(-len(layers) // cols)
    fig = _figure(figsize=(4.5 * cols, 3.5 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, layer in zip(axes.flat, layers, strict=False):
        values = {stage: weights[layer].detach().float().reshape(-1) for stage, weights in stages.items()}
        bound = max(float(v.abs().max()) for v in values.values()) or 1.0
        for stage, v in values.items():
            nonzero = v[v != 0]
            scale = (sizes[layer] / max(v.numel(), 1)) if sizes and layer in sizes else 1.0
            count = f"~{round(nonzero.numel() * scale):,}" if scale > 1 else f"{nonzero.numel():,}"
            ax.hist(nonzero.numpy(), bins=bins, range=(-bound, bound), histtype="step", linewidth=1.2,
                    weights=np.full(nonzero.numel(), scale), label=f"{stage} ({count} nonzero)")
        ax.set_title(layer)
        ax.set_yscale("log")  # a pruned layer keeps ~10% of the weights: on a linear axis its bars vanish
        ax.set_xlabel("weight value")
        ax.set_ylabel("count (log scale)")
        ax.legend(fontsize="x-small")
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    path = _save(fig, path)
    return path
