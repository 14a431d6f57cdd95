"""Schedules room: when to prune and how much (one-shot, iterative, Zhu & Gupta's gradual cubic).

Shaped like ``torch.optim.lr_scheduler``: build it around a pruner, call :meth:`PruningSchedule.step` once per
training step (or epoch: the unit is yours) after ``optimizer.step()``, save it with ``state_dict()``. The k-th call
to ``step()``, counting from 0, is step k; ``step()`` returns True when it pruned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from magprune.criteria import GlobalSparsity, LayerSparsity

CriterionLike = Any  # a callable (weights, masks) -> {name: keep_mask}; see magprune.criteria


class SupportsPrune(Protocol):
    def prune(self, criterion: CriterionLike) -> Mapping[str, float]: ...


class PruningSchedule:
    """Base class: subclasses say which criterion applies at a step (or None for no pruning there)."""

    def __init__(self, pruner: SupportsPrune) -> None:
        if not callable(getattr(pruner, "prune", None)):
            raise TypeError(f"pruner must have a prune(criterion) method, got {type(pruner).__name__}")
        self.pruner = pruner
        self.last_step = -1

    def criterion_at(self, step: int) -> CriterionLike | None:
        raise NotImplementedError

    def prune_steps(self) -> list[int]:
        """The steps at which this schedule prunes."""
        raise NotImplementedError

    def step(self) -> bool:
        """Advance one step; prune if this step is a pruning step. Returns whether it pruned."""
        self.last_step += 1
        criterion = self.criterion_at(self.last_step)
        if criterion is None:
            return False
        self.pruner.prune(criterion)
        return True

    @property
    def finished(self) -> bool:
        """True once every pruning step has passed."""
        steps = self.prune_steps()
        return not steps or self.last_step >= steps[-1]

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        last_step = state_dict.get("last_step") if isinstance(state_dict, Mapping) else None
        if not isinstance(last_step, int) or last_step < -1:
            raise ValueError(f"schedule state_dict must hold an integer 'last_step' >= -1, got {last_step!r}")
        self.last_step = last_step


def _check_step(value: object, argument: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{argument} must be an integer >= {minimum}, got {value!r}")
    return value


class OneShot(PruningSchedule):
    """Prune once, with ``criterion``, at step ``at_step``; then retrain."""

    def __init__(self, pruner: SupportsPrune, criterion: CriterionLike, at_step: int = 0) -> None:
        super().__init__(pruner)
        self.criterion = criterion
        self.at_step = _check_step(at_step, "at_step")

    def prune_steps(self) -> list[int]:
        return [self.at_step]

    def criterion_at(self, step: int) -> CriterionLike | None:
        return self.criterion if step == self.at_step else None


class Iterative(PruningSchedule):
    """Prune with ``criteria[i]`` at step ``start + i * every``, retraining in between (Han's iterative pruning).

    Example: ``Iterative(pruner, [LayerSparsity(s) for s in (0.5, 0.75, 0.9)], every=epochs_per_round)``.
    """

    def __init__(self, pruner: SupportsPrune, criteria: Sequence[CriterionLike], every: int, start: int = 0) -> None:
        super().__init__(pruner)
        if isinstance(criteria, (str, bytes)) or not isinstance(criteria, Sequence) or not criteria:
            raise ValueError("criteria must be a non-empty list of criteria, one per pruning round")
        self.criteria = list(criteria)
        self.every = _check_step(every, "every", minimum=1)
        self.start = _check_step(start, "start")

    def prune_steps(self) -> list[int]:
        return [self.start + i * self.every for i in range(len(self.criteria))]

    def criterion_at(self, step: int) -> CriterionLike | None:
        offset = step - self.start
        if offset < 0 or offset % self.every:
            return None
        index = offset // self.every
        return self.criteria[index] if index < len(self.criteria) else None


def cubic_sparsity(step: int, *, initial: float, final: float, begin: int, end: int) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt))^3, clamped to [begin, end]."""
    if end <= begin:
        raise ValueError(f"end must be > begin, got begin={begin}, end={end}")
    progress = min(max((step - begin) / (end - begin), 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


class GradualCubic(PruningSchedule):
    """Zhu & Gupta's gradual pruning: sparsity rises from ``initial_sparsity`` to ``final_sparsity`` along a cubic,
    pruning at ``begin_step``, every ``frequency`` steps after, and at ``end_step``.

    Args:
        final_sparsity: one fraction, or a mapping of layer name to fraction (each layer follows its own cubic).
        scope: ``"layer"`` (every layer reaches the sparsity) or ``"global"`` (magnitude ranking across layers;
            needs a single final sparsity).
    """

    def __init__(
        self,
        pruner: SupportsPrune,
        final_sparsity: float | Mapping[str, float],
        *,
        begin_step: int,
        end_step: int,
        frequency: int,
        initial_sparsity: float = 0.0,
        scope: str = "layer",
    ) -> None:
        super().__init__(pruner)
        self.begin_step = _check_step(begin_step, "begin_step")
        self.end_step = _check_step(end_step, "end_step", minimum=begin_step + 1)
        self.frequency = _check_step(frequency, "frequency", minimum=1)
        if scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
        if scope == "global" and isinstance(final_sparsity, Mapping):
            raise ValueError("final_sparsity must be a single fraction when scope='global'")
        # Validate through the criterion that will use them.
        LayerSparsity(final_sparsity)
        LayerSparsity(initial_sparsity)
        self.final_sparsity = final_sparsity
        self.initial_sparsity = float(initial_sparsity)
        self.scope = scope

    def prune_steps(self) -> list[int]:
        steps = list(range(self.begin_step, self.end_step, self.frequency))
        return [*steps, self.end_step]

    def sparsity_at(self, step: int) -> float | dict[str, float]:
        """Target sparsity at ``step`` (per layer when final_sparsity is a mapping)."""
        def cubic(final: float) -> float:
            return cubic_sparsity(step, initial=self.initial_sparsity, final=final,
                                  begin=self.begin_step, end=self.end_step)
        if isinstance(self.final_sparsity, Mapping):
            return {name: cubic(final) for name, final in self.final_sparsity.items()}
        return cubic(self.final_sparsity)

    def criterion_at(self, step: int) -> CriterionLike | None:
        if step < self.begin_step or step > self.end_step:
            return None
        if (step - self.begin_step) % self.frequency and step != self.end_step:
            return None
        target = self.sparsity_at(step)
        return GlobalSparsity(target) if self.scope == "global" else LayerSparsity(target)

