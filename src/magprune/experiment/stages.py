"""Stages room: a run is a list of stages (dense training, one prune + retrain per config step, then quantize if
configured) working on one :class:`RunContext`; each checkpoints its own progress as plain data, so
:mod:`.pipeline`'s driver can resume it.

Adding a stage (:class:`Quantize` is a worked example):

1. Subclass :class:`Stage`: a ``name`` unique in the run (checkpoints and resume messages name the stage by it)
   and ``run(ctx, state)``. ``run`` works on ``ctx.model`` / ``ctx.pruner``, logs metric rows with ``ctx.log``,
   puts what the summary reports into ``ctx.results`` (saved in every checkpoint), and calls
   ``ctx.checkpoint(state)`` wherever a crash should not lose the work so far. ``state`` is plain data (dicts,
   lists, numbers, tensors: what ``torch.load(weights_only=True)`` reads); on resume ``run`` gets the last one
   back, ``None`` meaning "start from scratch". A stage that trains builds its loop with ``ctx.trainer`` and keeps
   the :class:`~magprune.experiment.train.TrainState` (as a dict) under ``state["train"]``, as :class:`PruneRetrain`
   does; the resume message reports its epoch and batch.
2. Optionally ``check(ctx)``: config errors the stage can see before any training starts.
3. Append it in :func:`build_stages`, where it belongs in the run, built from its config section.

The driver checkpoints after every finished stage, so a resumed run never repeats one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from magprune.analysis.plots import sample_weights
from magprune.criteria import GlobalSparsity, LayerSparsity, StdThreshold, han2015
from magprune.deploy.format import format_shared_table, save_compressed, shared_rows
from magprune.deploy.quantize import WeightSharing, bits_for
from magprune.experiment import distributed
from magprune.experiment.config import ConfigError, ExperimentConfig, PruneStep, QuantizeConfig
from magprune.experiment.rundir import RESUME_VERSION, RunError, RunWriter, load_resume_checkpoint, plain
from magprune.experiment.train import Trainer, TrainState, evaluate
from magprune.pruner import Pruner
from magprune.retrain import DropoutRescaler, freeze
from magprune.sparse_training import SparseCompute, sparse_compute


@dataclass
class Position:
    """Where a run stands: the stage in progress (an index into the run's stages; all of them: every stage done)
    and that stage's own resumable state (``None``: not started)."""

    stage: int = 0
    state: dict[str, Any] | None = None


@dataclass
class RunContext:
    """What the stages share: the model and its pruner, the data, the config, the run directory's writer, and the
    results so far. :meth:`checkpoint` / :meth:`resume` turn all of it, with a :class:`Position`, into
    ``checkpoints/resume.pt`` and back."""

    config: ExperimentConfig
    run_dir: Path
    stages: list[Stage]
    model: nn.Module
    pruner: Pruner
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    writer: RunWriter
    echo: Callable[[str], None] = print
    progress: bool = True
    stage: int = 0  # index of the stage running now
    results: dict[str, Any] = field(default_factory=lambda: {"dense_error": None, "steps": []})
    snapshots: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # weight samples for the histograms
    rescaler: DropoutRescaler | None = None
    load_average_start: list[float] | None = None  # the machine's load as this process began (for the report)
    build_model: Callable[[], nn.Module] | None = None  # a fresh model of the run's architecture (whole copies)

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded by FSDP2 (``train.distributed: fsdp`` under torchrun)."""
        return distributed.is_sharded(self.model)

    def whole_model(self) -> nn.Module:
        """The model with whole weights, for reports, histograms and files: the model itself, or for a sharded one
        a plain copy gathered on every rank (collective: every rank calls it)."""
        return distributed.whole_copy(self.model, self.build_model)

    def whole_weights(self) -> dict[str, Tensor]:
        """The pruned parameters, whole (collective under FSDP2)."""
        return {name: p for name, p in self.whole_model().named_parameters() if name in self.pruner.params}

    def whole_masks(self) -> dict[str, Tensor]:
        """The masks, whole (collective under FSDP2)."""
        return distributed.whole_masks(self.pruner.masks)
    validation: tuple[Tensor, Tensor] | None = None  # data.validation: training images held out, never trained on

    def evaluate(self) -> float:
        """The model's test error."""
        return evaluate(self.model, *self.test, batch_size=self.config.train.eval_batch_size)[1]

    def final_errors(self, rows: list[dict[str, Any]]) -> tuple[float, float | None]:
        """(test error, validation error) of the model as a stage's training left it: its last epoch's, evaluated
        then on these weights (``rows`` from ``Trainer.fit``), or evaluated now where no epoch ran in this process
        (resumed after the last one). Evaluating again gave the same numbers at the cost of two more passes."""
        errors = (rows[-1]["test_error"], rows[-1]["validation_error"]) if rows else \
            (self.evaluate(), self.validation_error())
        self.results["final_errors"] = list(errors)  # the run's, unless a later stage trains again
        return errors

    def validation_error(self) -> float | None:
        """The model's error on the held-out validation split (None without one)."""
        if self.validation is None or not len(self.validation[1]):
            return None
        return evaluate(self.model, *self.validation, batch_size=self.config.train.eval_batch_size)[1]

    def compression(self) -> float:
        """All parameters / those not pruned away (Table 1's compression: biases and untargeted parameters count as
        kept), from the masks now."""
        total = sum(p.numel() for p in self.model.parameters())
        targeted = sum(p.numel() for p in self.pruner.params.values())
        return total / (total - self.pruner.sparsity() * targeted)

    def log(self, row: dict[str, Any], step: int) -> None:
        """Append a metrics row (``step``: 0 for dense training, i for the i-th prune step) with the sparsity now."""
        self.writer.log({**row, "step": step, "sparsity": self.pruner.sparsity()})

    def log_epoch(self, step: int) -> Callable[[dict[str, Any]], None]:
        def log(row: dict[str, Any]) -> None:
            self.log(row, step)
            # with a validation split its error comes first: it is the one a recipe is chosen on
            held = "" if row.get("validation_error") is None else \
                f"validation error {100 * row['validation_error']:.2f}%, "
            self.echo(f"  {row['stage']} epoch {row['epoch']}: train loss {row['train_loss']:.4f}, {held}"
                      f"test error {100 * row['test_error']:.2f}% ({row['seconds']:.1f} s)")
        return log

    def trainer(self, stage: str, *, lr: float, epochs: int, seed: int, state: dict[str, Any] | None,
                compute: SparseCompute | None = None) -> Trainer:
        """The training loop of a stage on this run's model and data, continued from ``state`` if given (with
        ``compute`` on, the penalty applies to its compact weights)."""
        penalized = list(self.pruner.params.values())
        trainer = Trainer(self.model, self.train, self.test, self.config.train, lr=lr, epochs=epochs, seed=seed,
                          stage=stage, penalized=compute.compact(penalized) if compute is not None else penalized,
                          checkpoint_every=self.config.output.checkpoint_every, progress=self.progress,
                          validation=self.validation)
        if state is not None:
            trainer.load_state(TrainState.from_dict(state))
        return trainer

    def checkpoint(self, state: dict[str, Any] | None) -> None:
        """Save the running stage's ``state`` with everything else a resume needs."""
        self.save(Position(self.stage, state))

    def save(self, position: Position) -> None:
        if self.sharded:  # sharded optimizer state: no resume.pt (see resume)
            return
        if not self.writer.checkpoints:  # output.checkpoints: false, or a DDP rank other than 0: nothing to build
            return
        self.writer.resume_checkpoint({
            "version": RESUME_VERSION, "stages": [s.name for s in self.stages],
            "position": {"stage": position.stage, "state": position.state}, "model": plain(self.model.state_dict()),
            "masks": plain(self.pruner.masks), "rows": self.writer.rows, "results": self.results,
            "rng": torch.get_rng_state()})

    def resume(self) -> Position:
        """Load the last complete checkpoint of the run directory into this context; where to go on from."""
        if self.sharded:
            raise ConfigError("--resume: a train.distributed: fsdp run writes no resume checkpoints (its optimizer "
                              "state is sharded); rerun it, or resume your own loop from magprune.sharding."
                              "save_sharded")
        saved = load_resume_checkpoint(self.run_dir)
        if saved is None:  # killed before the first checkpoint: start over
            return Position()
        names = [s.name for s in self.stages]
        if saved["stages"] != names:
            raise RunError(f"{self.run_dir}: the checkpoint was written for stages {saved['stages']}, the config "
                           f"now gives {names}")
        self.model.load_state_dict(saved["model"])
        if saved["masks"]:
            self.pruner.load_state_dict({"masks": {k: v.to(self.device) for k, v in saved["masks"].items()}})
        self.writer.rows, self.results = list(saved["rows"]), saved["results"]
        torch.set_rng_state(saved["rng"])
        position = Position(**saved["position"])
        train = (position.state or {}).get("train")
        where = f", after epoch {train['epoch']}" + (f", batch {train['batch']}" if train["batch"] else "") \
            if train else ""
        name = names[position.stage] if position.stage < len(names) else "the end (every stage done)"
        self.echo(f"resuming {self.run_dir} at {name}{where}")
        return position

    @property
    def device(self) -> torch.device:
        return self.train[0].device


class Stage:
    """One part of a run; see the module docstring for how to write one."""

    name: str

    def check(self, ctx: RunContext) -> None:
        """Raise ConfigError for what this stage cannot do with ``ctx``'s model, before any training."""

    def run(self, ctx: RunContext, state: dict[str, Any] | None) -> None:
        """Do the stage's work (continue from ``state`` if not None), checkpointing with ``ctx.checkpoint``."""
        raise NotImplementedError


class DenseTraining(Stage):
    """Train the dense model (``train:``), with Han's regularization on the prunable weights."""

    name = "dense"

    def run(self, ctx: RunContext, state: dict[str, Any] | None) -> None:
        cfg = ctx.config.train
        trainer = ctx.trainer("dense", lr=cfg.lr, epochs=cfg.epochs, seed=ctx.config.seed,
                              state=state["train"] if state else None)
        rows = trainer.fit(on_epoch=ctx.log_epoch(0),
                           on_checkpoint=lambda t: ctx.checkpoint({"train": t.as_dict()}))
        error, validation = ctx.final_errors(rows)
        ctx.results["dense_error"], ctx.results["dense_validation_error"] = error, validation
        ctx.echo(f"dense: test error {100 * error:.2f}%"
                 + (f", validation error {100 * validation:.2f}%" if validation is not None else ""))
        whole = ctx.whole_model()
        ctx.writer.checkpoint("dense", whole, {}, {"stage": "dense", "test_error": error})
        ctx.snapshots["dense"] = sample_weights({n: p for n, p in whole.named_parameters() if n in ctx.pruner.params})


class PruneRetrain(Stage):
    """The ``index``-th prune step: prune by its criterion, then retrain the remaining weights (``retrain:``)."""

    def __init__(self, index: int, step: PruneStep) -> None:
        self.index, self.step, self.name = index, step, f"step-{index}"
        self.where = f"prune[{index - 1}].retrain.freeze"

    def check(self, ctx: RunContext) -> None:
        frozen = freeze_layers(ctx.model, self.step.retrain.freeze, self.where)
        if frozen is not None:
            frozen.remove()
        if self.step.retrain.compute == "sparse" and ctx.device.type != "cpu":
            raise ConfigError(f"prune[{self.index - 1}].retrain.compute: 'sparse' runs on CPU (its kernels are CPU "
                              f"code); this run uses {ctx.device}")

    def run(self, ctx: RunContext, state: dict[str, Any] | None) -> None:
        i, retrain = self.index, self.step.retrain
        if state is None:  # not pruned yet
            state = {"pruned": self.prune(ctx), "train": None}
            ctx.checkpoint(state)
        if ctx.rescaler is not None and retrain.dropout_rescale:
            ctx.rescaler.apply()
        frozen = freeze_layers(ctx.model, retrain.freeze, self.where)  # before the optimizer: it takes what trains
        # sparse compute before the trainer too: its optimizer and DDP wrapper must take the compact weights
        compute = self.sparse_compute(ctx) if retrain.compute == "sparse" else None
        trainer = ctx.trainer(f"retrain-{i}", lr=ctx.config.train.lr * retrain.lr_fraction, epochs=retrain.epochs,
                              seed=ctx.config.seed + i, state=state["train"], compute=compute)
        handle = ctx.pruner.attach(trainer.optimizer)
        try:
            rows = trainer.fit(on_epoch=ctx.log_epoch(i),
                               on_checkpoint=lambda t: ctx.checkpoint({**state, "train": t.as_dict()}))
        finally:
            if compute is not None:
                compute.remove()
            handle.remove()
            if frozen is not None:
                frozen.remove()
        ctx.pruner.check()
        error, validation = ctx.final_errors(rows)
        ctx.results["steps"].append({"step": i, "criterion": self.step.criterion,
                                     "densities": state["pruned"]["densities"], "sparsity": ctx.pruner.sparsity(),
                                     "compression": ctx.compression(),
                                     "error_pruned": state["pruned"]["pruned_error"], "error_retrained": error,
                                     "validation_error": validation})
        ctx.writer.checkpoint(self.name, ctx.whole_model(), ctx.whole_masks(),
                              {"stage": self.name, **ctx.results["steps"][-1]})
        ctx.echo(f"retrain {i}: test error {100 * error:.2f}%")

    def sparse_compute(self, ctx: RunContext) -> SparseCompute:
        try:
            return sparse_compute(ctx.model, ctx.pruner)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"prune[{self.index - 1}].retrain.compute: 'sparse' cannot apply: {exc}") from exc

    def prune(self, ctx: RunContext) -> dict[str, Any]:
        densities = ctx.pruner.prune(build_criterion(self.step))
        ctx.snapshots["pruned"] = sample_weights(ctx.whole_weights())
        error = ctx.evaluate()
        ctx.log({"stage": f"prune-{self.index}", "test_error": error}, self.index)
        ctx.echo(f"prune {self.index} ({self.step.criterion}): sparsity {100 * ctx.pruner.sparsity():.2f}%, "
                 f"test error before retraining {100 * error:.2f}%")
        return {"densities": densities, "pruned_error": error}


class Quantize(Stage):
    """Deep Compression's weight sharing (``quantize:``) after the last prune step: per layer k-means over the
    surviving weights, then the shared values fine-tuned (each moves by the sum of its members' gradients), then
    the model written in the compressed format v3 (``model.quantized.safetensors``) with Deep Compression's table.

    Its state: the clustering (labels, masks; the codebooks live in the model's weights) and the fine-tuning's."""

    name = "quantize"

    def __init__(self, step: int, cfg: QuantizeConfig) -> None:
        self.step, self.cfg = step, cfg

    def check(self, ctx: RunContext) -> None:
        for name in ctx.pruner.params:
            try:
                bits_for(ctx.model, name, self.cfg.bits)
            except ValueError as exc:
                raise ConfigError(f"quantize.{exc}") from exc

    def run(self, ctx: RunContext, state: dict[str, Any] | None) -> None:
        q = self.cfg
        if state is None:  # not shared yet
            sharing = WeightSharing(ctx.model, ctx.pruner, bits=q.bits, init=q.init, seed=ctx.config.seed)
            error = ctx.evaluate()
            ctx.log({"stage": "quantize-shared", "test_error": error}, self.step)
            ctx.echo(f"quantize: {sharing}, test error before fine-tuning {100 * error:.2f}%")
            state = {"sharing": sharing.state_dict(), "shared_error": error, "train": None}
            ctx.checkpoint(state)
        else:  # resumed: the checkpoint's weights hold the fine-tuned shared values
            weights = {n: p.detach().clone() for n, p in ctx.pruner.params.items()}
            sharing = WeightSharing(ctx.model, ctx.pruner, bits=q.bits, init=q.init, max_iter=0)
            sharing.load_state_dict(state["sharing"])
            with torch.no_grad():
                for name, param in ctx.pruner.params.items():
                    param.copy_(weights[name])
            sharing.update_centroids()
        trainer = ctx.trainer("quantize", lr=ctx.config.train.lr * q.lr_fraction, epochs=q.epochs,
                              seed=ctx.config.seed + self.step, state=state["train"])
        handles = [ctx.pruner.attach(trainer.optimizer),
                   sharing.attach(trainer.optimizer, reset_state=state["train"] is None)]
        try:
            rows = trainer.fit(on_epoch=ctx.log_epoch(self.step),
                               on_checkpoint=lambda t: ctx.checkpoint({**state, "train": t.as_dict()}))
        finally:
            for handle in handles:
                handle.remove()
        sharing.check()
        ctx.pruner.check()
        error = ctx.final_errors(rows)[0]
        ctx.echo(f"quantize: test error after {q.epochs} fine-tuning epochs {100 * error:.2f}%")
        ctx.results["quantize"] = {"bits": sharing.bits, "init": q.init, "epochs": q.epochs,
                                   "error_shared": state["shared_error"], "error_fine_tuned": error,
                                   **(self.write(ctx) if ctx.writer.enabled else {})}

    def write(self, ctx: RunContext) -> dict[str, Any]:
        """model.quantized.safetensors and the numbers of Deep Compression's table."""
        config = ctx.config
        path = ctx.run_dir / "model.quantized.safetensors"
        spec = json.dumps({"name": config.model.name, "kwargs": dict(config.model.kwargs)})
        params = save_compressed(ctx.model, path, metadata={"model": spec})
        file_bytes = path.stat().st_size
        dense_bytes = 4 * sum(t.numel() for t in ctx.model.state_dict().values())
        return {"file": path.name, "file_bytes": file_bytes, "dense_fp32_bytes": dense_bytes,
                "file_ratio": dense_bytes / file_bytes, "table": format_shared_table(shared_rows(params), file_bytes)}


def build_stages(config: ExperimentConfig) -> list[Stage]:
    """The stages ``config`` describes, in run order (``repeat: n`` has already made n prune steps)."""
    stages: list[Stage] = [DenseTraining(), *(PruneRetrain(i, step) for i, step in enumerate(config.prune, start=1))]
    if config.quantize is not None:
        stages.append(Quantize(len(config.prune) + 1, config.quantize))
    return stages


def build_criterion(step: PruneStep):
    """The :mod:`magprune.criteria` object a validated prune step describes."""
    if step.criterion == "han2015":
        return han2015(step.network)
    if step.criterion == "density":
        return LayerSparsity.from_densities(step.density) if isinstance(step.density, dict) \
            else LayerSparsity(1.0 - step.density)
    if step.criterion == "sparsity":
        return LayerSparsity(step.sparsity)
    if step.criterion == "global":
        return GlobalSparsity(step.sparsity, step.layers)
    return StdThreshold(step.q)


def freeze_layers(model: nn.Module, kind: str, where: str) -> Any:
    """Freeze the ``kind`` layers for a retraining (None for "none"); a freeze that cannot apply is a ConfigError."""
    if kind == "none":
        return None
    try:
        frozen = freeze(model, kind)
    except ValueError as exc:
        raise ConfigError(f"{where}: cannot freeze {kind!r} layers: {exc}") from exc
    if not any(p.requires_grad for p in model.parameters()):
        frozen.remove()
        raise ConfigError(f"{where}: freezing the {kind!r} layers of {type(model).__name__} leaves nothing to train")
    return frozen
