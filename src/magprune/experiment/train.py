"""Train room: fit/evaluate loops over whole-dataset tensors, optimizers and lr schedules (Caffe's "inv" included)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from magprune.experiment import distributed
from magprune.experiment.config import LRSchedule, TrainConfig
from magprune.retrain import weight_penalty


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

    Under DDP each rank evaluates its share of the examples and the sums are added over ranks.
    """
    was_training = model.training
    model.eval()
    index = distributed.shard(torch.arange(len(y)))
    loss, wrong = 0.0, 0
    for start in range(0, len(index), batch_size):
        idx = index[start:start + batch_size]
        out = model(x[idx])
        target = y[idx]
        loss += F.cross_entropy(out, target, reduction="sum").item()
        wrong += int((out.argmax(1) != target).sum())
    model.train(was_training)
    loss, wrong = distributed.sum_over_ranks([loss, wrong])
    return loss / max(len(y), 1), wrong / max(len(y), 1)


def fit(
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    cfg: TrainConfig,
    *,
    lr: float,
    epochs: int,
    seed: int,
    stage: str,
    penalized: list[Tensor],
    on_optimizer: Callable[[torch.optim.Optimizer], Any] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_epoch_state: Callable[[dict[str, Any]], None] | None = None,
    resume: dict[str, Any] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    checkpoint_every: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train ``model`` for ``epochs`` on whole-tensor data; returns one metrics row per epoch.

    ``penalized`` are the tensors ``cfg.regularization`` applies to (Han regularizes the prunable weights).
    ``on_optimizer`` sees the new optimizer before the first step (a pruner attaches there). Shuffling uses its own
    generator seeded from ``seed``, so the run is reproducible on one machine.

    After each epoch ``on_epoch_state`` gets everything needed to continue exactly from there (epoch, optimizer,
    lr schedule, shuffling generator and global RNG states); giving that back as ``resume`` skips the finished
    epochs and continues as if never interrupted. With ``checkpoint_every`` > 0 the same state also goes to
    ``on_epoch_state`` every that many optimizer steps inside an epoch (with the batch position, the epoch's
    shuffling state and the running sums of the epoch's metrics), and resuming from it continues mid-epoch.
    """
    from tqdm import tqdm

    x, y = train
    distributed.check_batch_size(cfg.batch_size)
    # A fresh DDP wrapper per stage: which parameters train (freezing) may change between stages.
    net = torch.nn.parallel.DistributedDataParallel(model) if distributed.is_distributed() else model
    optimizer = make_optimizer(model.parameters(), cfg, lr)
    steps_per_epoch = math.ceil(len(y) / cfg.batch_size)
    total = steps_per_epoch * epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(cfg.lr_schedule, it, steps_per_epoch, total))
    generator = torch.Generator().manual_seed(seed)
    first_epoch, skip, partial = 1, 0, [0.0, 0, 0]
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])
        generator.set_state(resume["generator"])
        torch.set_rng_state(resume["rng"])
        first_epoch = resume["epoch"] + 1
        if resume.get("batch"):  # mid-epoch: replay that epoch's shuffle, skip the batches already trained
            skip = resume["batch"]
            if distributed.is_main():  # the saved sums are over all ranks already
                partial = list(resume["partial"])
    if on_optimizer is not None:
        on_optimizer(optimizer)
    penalize = cfg.regularization != "none" and cfg.strength > 0 and penalized
    rows = []
    for epoch in range(first_epoch, epochs + 1):
        start = time.perf_counter()
        model.train()
        loss_sum, wrong, seen = partial if epoch == first_epoch else (0.0, 0, 0)
        epoch_generator = generator.get_state()
        batches = torch.randperm(len(y), generator=generator).split(cfg.batch_size)
        if epoch == first_epoch and skip:
            batches = batches[skip:]
        bar = tqdm(batches, desc=f"{stage} {epoch}/{epochs}", leave=False,
                   disable=not progress or not distributed.is_main(), unit="batch")
        for batch, global_idx in enumerate(bar, start=skip if epoch == first_epoch else 0):
            if on_batch is not None:
                on_batch(epoch, batch)
            idx = distributed.shard(global_idx)
            xb, yb = x[idx], y[idx]
            out = net(xb)
            loss = F.cross_entropy(out, yb)
            total_loss = loss + weight_penalty(penalized, cfg.regularization, cfg.strength) if penalize else loss
            optimizer.zero_grad(set_to_none=True)
            total_loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.item() * len(yb)
            wrong += int((out.argmax(1) != yb).sum())
            seen += len(yb)
            done = batch + 1
            if checkpoint_every and on_epoch_state is not None and done % checkpoint_every == 0 \
                    and done < steps_per_epoch:
                on_epoch_state({"epoch": epoch - 1, "batch": done, "generator": epoch_generator,
                                "partial": distributed.sum_over_ranks([loss_sum, wrong, seen]),
                                "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                                "rng": torch.get_rng_state()})
        bar.close()
        loss_sum, wrong, seen = distributed.sum_over_ranks([loss_sum, wrong, seen])
        test_loss, test_error = evaluate(model, *test, batch_size=cfg.eval_batch_size)
        row = {"stage": stage, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
               "train_loss": loss_sum / seen, "train_error": wrong / seen,
               "test_loss": test_loss, "test_error": test_error, "seconds": time.perf_counter() - start}
        if not math.isfinite(row["train_loss"]):
            raise TrainingDiverged(f"{stage} epoch {epoch}: the training loss is {row['train_loss']} (lr {lr} too "
                                   "high?); the run stops here, its last checkpoint is the last good epoch")
        rows.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if on_epoch_state is not None:
            on_epoch_state({"epoch": epoch, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                            "generator": generator.get_state(), "rng": torch.get_rng_state()})
    return rows


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""
