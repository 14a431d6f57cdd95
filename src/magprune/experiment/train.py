"""Train room: the one epoch loop (a :class:`Trainer` whose position is a :class:`TrainState`), evaluation,
optimizers and lr schedules (Caffe's "inv" included)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from magprune import sharding
from magprune.experiment import distributed
from magprune.experiment.config import LRSchedule, TrainConfig
from magprune.retrain import add_penalty_gradient, weight_penalty


def make_optimizer(params: Iterable[Tensor], cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum)


def lr_factor(schedule: LRSchedule, iteration: int, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of the base lr at ``iteration`` (0-based optimizer step) under ``schedule``."""
    if schedule.policy == "inv":  # Caffe: base_lr * (1 + gamma * iter) ^ (-power)
        return (1.0 + schedule.gamma * iteration) ** (-schedule.power)
    if schedule.policy == "step":
        return schedule.gamma ** (iteration // (schedule.step_epochs * steps_per_epoch))
    if schedule.policy == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(iteration / max(total_steps, 1), 1.0)))
    return 1.0


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 2000) -> tuple[float, float]:
    """(mean cross-entropy loss, error rate) of ``model`` on ``x``, ``y``.

    Under DDP each rank evaluates its share of the examples and the sums are added over ranks. Every rank runs
    as many batches (the last may be empty on some): an FSDP2 forward is collective.
    """
    was_training = model.training
    model.eval()
    index = distributed.shard(torch.arange(len(y)))
    loss, wrong = 0.0, 0
    for start in range(0, -(-len(y) // distributed.world_size()), batch_size):
        idx = index[start:start + batch_size]
        out = model(x[idx])
        target = y[idx]
        loss += F.cross_entropy(out, target, reduction="sum").item()
        wrong += int((out.argmax(1) != target).sum())
    model.train(was_training)
    loss, wrong = distributed.sum_over_ranks([loss, wrong])
    return loss / max(len(y), 1), wrong / max(len(y), 1)


@dataclass
class TrainState:
    """Where a :class:`Trainer` stands, as plain data: what a checkpoint stores to continue exactly from there.

    ``epoch`` epochs are finished and ``batch`` optimizer steps of the next one (0 at an epoch boundary);
    ``generator`` is the shuffling generator's state at the start of that next epoch, so replaying its shuffle and
    skipping ``batch`` batches continues mid-epoch; ``sums`` are that epoch's running (loss, wrong, seen), over all
    ranks. ``rng`` is the global torch RNG (dropout).
    """

    epoch: int
    batch: int
    generator: Tensor
    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    rng: Tensor
    sums: list[float] = field(default_factory=lambda: [0.0, 0, 0])

    def as_dict(self) -> dict[str, Any]:
        """A plain dict (what ``torch.load(weights_only=True)`` reads back)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> TrainState:
        return cls(**{f.name: state[f.name] for f in fields(cls)})


class Trainer:
    """``epochs`` epochs of minibatch SGD/Adam over whole-tensor data, one metrics row per epoch (test error, and the
    validation error given a held-out ``validation`` split).

    ``penalized`` are the tensors ``cfg.regularization`` applies to (Han regularizes the prunable weights). Shuffling
    uses its own generator seeded from ``seed``, so a run is reproducible on one machine. The optimizer exists from
    the start (``trainer.optimizer``: a pruner attaches there); :meth:`state` and :meth:`load_state` are the
    position as data. Under DDP each rank trains its shard of every global batch through a fresh DDP wrapper (which
    parameters train may change between stages).
    """

    def __init__(self, model: nn.Module, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], cfg: TrainConfig,
                 *, lr: float | None = None, epochs: int | None = None, seed: int = 0, stage: str = "train",
                 penalized: Sequence[Tensor] = (), checkpoint_every: int = 0, progress: bool = False,
                 validation: tuple[Tensor, Tensor] | None = None) -> None:
        distributed.check_batch_size(cfg.batch_size, len(train[1]))
        self.model, self.train, self.test, self.cfg, self.stage = model, train, test, cfg, stage
        self.validation = validation if validation is not None and len(validation[1]) else None
        self.lr = cfg.lr if lr is None else lr
        self.epochs = cfg.epochs if epochs is None else epochs
        self.penalized = list(penalized) if cfg.regularization != "none" and cfg.strength > 0 else []
        # the penalty's gradient is added after backward (add_penalty_gradient); FSDP2 shards keep it in the loss,
        # where _whole sums the shards' partial penalties
        self._penalty_in_loss = any(sharding.is_sharded(p) for p in self.penalized)
        self.checkpoint_every, self.progress = checkpoint_every, progress
        # A fresh DDP wrapper per trainer: which parameters train (freezing) may change between stages. A model
        # sharded by FSDP2 (train.distributed: fsdp) was wrapped once, before the pruner took its parameters.
        ddp = distributed.is_distributed() and not distributed.is_sharded(model)
        self.net = nn.parallel.DistributedDataParallel(model) if ddp else model
        self.optimizer = make_optimizer(model.parameters(), cfg, self.lr)
        self.steps_per_epoch = math.ceil(len(train[1]) / cfg.batch_size)
        total = self.steps_per_epoch * self.epochs
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: lr_factor(cfg.lr_schedule, it, self.steps_per_epoch, total))
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.batch, self.sums = 0, 0, [0.0, 0, 0]  # this rank's sums of the epoch in progress
        self._epoch_start = self.generator.get_state()

    def state(self) -> TrainState:
        """The position now (under DDP a collective: every rank calls it at the same step)."""
        sums = distributed.sum_over_ranks(self.sums) if self.batch else [0.0, 0, 0]
        generator = self._epoch_start if self.batch else self.generator.get_state()
        return TrainState(epoch=self.epoch, batch=self.batch, generator=generator, sums=sums,
                          optimizer=self.optimizer.state_dict(), schedule=self.schedule.state_dict(),
                          rng=torch.get_rng_state())

    def load_state(self, state: TrainState) -> None:
        """Continue from ``state`` as if never interrupted."""
        self.optimizer.load_state_dict(state.optimizer)
        self.schedule.load_state_dict(state.schedule)
        self.generator.set_state(state.generator)
        torch.set_rng_state(state.rng)
        self.epoch, self.batch = state.epoch, state.batch
        # the saved sums are over all ranks already: one rank carries them on
        self.sums = list(state.sums) if self.batch and distributed.is_main() else [0.0, 0, 0]

    def fit(self, on_epoch: Callable[[dict[str, Any]], None] | None = None,
            on_checkpoint: Callable[[TrainState], None] | None = None) -> list[dict[str, Any]]:
        """Train the epochs not yet done; after each, ``on_epoch(row)`` then ``on_checkpoint(state)``."""
        rows = []
        while self.epoch < self.epochs:
            rows.append(self.train_epoch(on_checkpoint))
            if on_epoch is not None:
                on_epoch(rows[-1])
            if on_checkpoint is not None:
                on_checkpoint(self.state())
        return rows

    def train_epoch(self, on_checkpoint: Callable[[TrainState], None] | None = None) -> dict[str, Any]:
        """One epoch (the rest of it, after a mid-epoch resume), then the test set; returns its metrics row.

        With ``checkpoint_every`` > 0, ``on_checkpoint`` also gets the state every that many steps inside it.
        """
        from tqdm import tqdm

        start = time.perf_counter()
        self.model.train()
        self._epoch_start = self.generator.get_state()
        batches = torch.randperm(len(self.train[1]), generator=self.generator).split(self.cfg.batch_size)
        bar = tqdm(batches[self.batch:], desc=f"{self.stage} {self.epoch + 1}/{self.epochs}", leave=False,
                   disable=not self.progress or not distributed.is_main(), unit="batch")
        for indices in bar:
            self.step(indices)
            if self.checkpoint_every and on_checkpoint is not None and self.batch % self.checkpoint_every == 0 \
                    and self.batch < self.steps_per_epoch:
                state = self.state()
                self.check_finite(state.sums[0] / state.sums[2])
                on_checkpoint(state)
        bar.close()
        loss_sum, wrong, seen = distributed.sum_over_ranks(self.sums)
        self.check_finite(loss_sum / seen)
        test_loss, test_error = evaluate(self.model, *self.test, batch_size=self.cfg.eval_batch_size)
        validation_error = None if self.validation is None else \
            evaluate(self.model, *self.validation, batch_size=self.cfg.eval_batch_size)[1]
        self.epoch, self.batch, self.sums = self.epoch + 1, 0, [0.0, 0, 0]
        return {"stage": self.stage, "epoch": self.epoch, "lr": self.optimizer.param_groups[0]["lr"],
                "train_loss": loss_sum / seen, "train_error": wrong / seen,
                "test_loss": test_loss, "test_error": test_error, "validation_error": validation_error,
                "seconds": time.perf_counter() - start}

    def check_finite(self, train_loss: float) -> None:
        """Raise :class:`TrainingDiverged` if the epoch's mean loss so far or a weight is NaN/inf: called before
        every checkpoint, so that no checkpoint ever holds a diverged model."""
        if not math.isfinite(train_loss):
            what = f"the training loss is {train_loss}"
        elif not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            what = "the weights are no longer finite"
        else:
            return
        raise TrainingDiverged(f"{self.stage} epoch {self.epoch + 1}: {what} (lr {self.lr} too high?); the run stops "
                               "here, its last checkpoint is from before the divergence")

    def step(self, indices: Tensor) -> None:
        """One optimizer step on the global batch ``indices`` (this rank's shard of it)."""
        x, y = self.train
        idx = distributed.shard(indices)
        xb, yb = x[idx], y[idx]
        if self.cfg.channels_last and xb.dim() == 4:
            xb = xb.contiguous(memory_format=torch.channels_last)
        out = self.net(xb)
        loss = F.cross_entropy(out, yb)
        total = loss + _whole(weight_penalty(self.penalized, self.cfg.regularization, self.cfg.strength)) \
            if self._penalty_in_loss else loss
        self.optimizer.zero_grad(set_to_none=True)
        (total * distributed.loss_scale(len(yb), len(indices))).backward()  # exact with uneven shards
        if self.penalized and not self._penalty_in_loss:  # after DDP's average: the same on every rank
            add_penalty_gradient(self.penalized, self.cfg.regularization, self.cfg.strength)
        self.optimizer.step()
        self.schedule.step()
        self.sums[0] += loss.item() * len(yb)
        self.sums[1] += int((out.argmax(1) != yb).sum())
        self.sums[2] += len(yb)
        self.batch += 1


def _whole(value: Tensor) -> Tensor:
    # A penalty over FSDP2 shards is a DTensor of per-shard partial sums: summed over ranks (differentiably) it is
    # the single-process penalty, and each shard's gradient its own part of the whole one.
    return value.full_tensor() if sharding.is_sharded(value) else value


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""
