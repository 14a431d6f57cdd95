import pytest
import torch

from magprune import GlobalSparsity, GradualCubic, Iterative, LayerSparsity, OneShot, Pruner
from magprune.schedules import cubic_sparsity


class RecordingPruner:
    def __init__(self):
        self.calls = []

    def prune(self, criterion):
        self.calls.append(criterion)
        return {}


def run(schedule, steps):
    return [i for i in range(steps) if schedule.step()]


def test_cubic_sparsity_hand_computed():
    assert cubic_sparsity(0, initial=0.0, final=0.9, begin=0, end=10) == pytest.approx(0.0)
    assert cubic_sparsity(5, initial=0.0, final=0.9, begin=0, end=10) == pytest.approx(0.9 - 0.9 * 0.125)
    assert cubic_sparsity(10, initial=0.0, final=0.9, begin=0, end=10) == pytest.approx(0.9)
    assert cubic_sparsity(99, initial=0.1, final=0.5, begin=0, end=10) == pytest.approx(0.5)
    # t0 = 2, n*dt = 8, t = 4: 0.8 + (0.2 - 0.8) * (1 - 2/8)^3 = 0.8 - 0.6 * 0.421875
    assert cubic_sparsity(4, initial=0.2, final=0.8, begin=2, end=10) == pytest.approx(0.8 - 0.6 * 0.421875)
    with pytest.raises(ValueError, match="end must be > begin"):
        cubic_sparsity(0, initial=0, final=0.5, begin=3, end=3)


def test_gradual_cubic_prunes_on_its_grid_with_the_cubic_targets():
    pruner = RecordingPruner()
    schedule = GradualCubic(pruner, {"fc1": 0.8, "fc2": 0.4}, begin_step=2, end_step=10, frequency=4)
    assert schedule.prune_steps() == [2, 6, 10]
    assert run(schedule, 15) == [2, 6, 10]
    assert all(isinstance(c, LayerSparsity) for c in pruner.calls)
    assert pruner.calls[1].sparsity == pytest.approx({"fc1": 0.8 - 0.8 * 0.125, "fc2": 0.4 - 0.4 * 0.125})
    assert pruner.calls[2].sparsity == pytest.approx({"fc1": 0.8, "fc2": 0.4})
    assert schedule.finished
    glob = GradualCubic(RecordingPruner(), 0.9, begin_step=0, end_step=5, frequency=2, scope="global")
    assert glob.prune_steps() == [0, 2, 4, 5]
    assert isinstance(glob.criterion_at(5), GlobalSparsity)


def test_one_shot_and_iterative_steps():
    pruner = RecordingPruner()
    assert run(OneShot(pruner, "crit", at_step=3), 10) == [3]
    assert pruner.calls == ["crit"]
    pruner = RecordingPruner()
    schedule = Iterative(pruner, ["a", "b", "c"], every=4, start=1)
    assert run(schedule, 20) == [1, 5, 9]
    assert pruner.calls == ["a", "b", "c"]


def test_state_dict_resumes_where_it_stopped():
    pruner = RecordingPruner()
    schedule = Iterative(pruner, ["a", "b", "c"], every=2)
    run(schedule, 3)
    state = schedule.state_dict()
    resumed = Iterative(RecordingPruner(), ["a", "b", "c"], every=2)
    resumed.load_state_dict(state)
    assert [s for s in range(3, 8) if resumed.step()] == [4]
    assert resumed.pruner.calls == ["c"]
    with pytest.raises(ValueError, match="last_step"):
        resumed.load_state_dict({"last_step": "x"})


def test_schedule_drives_a_real_pruner_in_a_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 2))
    pruner = Pruner(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner.attach(optimizer)
    schedule = GradualCubic(pruner, 0.9, begin_step=0, end_step=20, frequency=5)
    x, y = torch.randn(64, 20), torch.randint(0, 2, (64,))
    sparsities = []
    for _ in range(25):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if schedule.step():
            sparsities.append(round(pruner.sparsity(), 3))
    assert sparsities == sorted(sparsities) and sparsities[-1] == pytest.approx(0.9, abs=1e-3)
    pruner.check()


def test_bad_schedule_arguments():
    pruner = RecordingPruner()
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        Iterative(pruner, ["a"], every=0)
    with pytest.raises(ValueError, match="criteria must be a non-empty list"):
        Iterative(pruner, [], every=1)
    with pytest.raises(ValueError, match="end_step must be an integer >= 6"):
        GradualCubic(pruner, 0.5, begin_step=5, end_step=5, frequency=1)
    with pytest.raises(ValueError, match="sparsity must be a sparsity"):
        GradualCubic(pruner, 1.2, begin_step=0, end_step=5, frequency=1)
    with pytest.raises(ValueError, match="scope must be"):
        GradualCubic(pruner, 0.5, begin_step=0, end_step=5, frequency=1, scope="net")
    with pytest.raises(TypeError, match="prune"):
        OneShot(object(), "c")
