"""The one training loop (experiment.train.Trainer): its position as data, resumed mid-epoch, and divergence."""

import copy

import pytest
import torch
from torch import nn

from magprune.experiment.config import TrainConfig
from magprune.experiment.train import Trainer, TrainingDiverged, TrainState


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


TRAIN, TEST = data(100, 0), data(40, 1)
CFG = TrainConfig(lr=0.1, momentum=0.9, epochs=3, batch_size=16, regularization="l2", strength=1e-3)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))  # dropout: the global RNG


def trainer(net, **kwargs):
    return Trainer(net, TRAIN, TEST, CFG, seed=5, penalized=[net[0].weight, net[3].weight], **kwargs)


def without_seconds(rows):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.mark.parametrize("every", [0, 3])
def test_a_trainer_continued_from_any_saved_state_ends_as_the_uninterrupted_one(every):
    net = model()
    saved = []  # (state, weights) at every checkpoint: what the pipeline writes to resume.pt
    rows = trainer(net, checkpoint_every=every).fit(
        on_checkpoint=lambda s: saved.append((copy.deepcopy(s.as_dict()), copy.deepcopy(net.state_dict()))))
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    steps = -(-len(TRAIN[1]) // CFG.batch_size)  # 7 per epoch: checkpoints after 3 and 6 steps, and at the end
    assert len(saved) == (3 * (1 + (steps - 1) // every) if every else 3)
    if every:
        assert [s["batch"] for s, _ in saved[:3]] == [3, 6, 0]
    for state, weights in saved:
        again = model()
        again.load_state_dict(weights)
        resumed = trainer(again, checkpoint_every=every)
        resumed.load_state(TrainState.from_dict(state))
        tail = resumed.fit()
        assert without_seconds(tail) == without_seconds(rows[state["epoch"]:])  # the mid-epoch sums carry on
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), net.state_dict().values(),
                                                     strict=True))


def test_no_checkpoint_is_offered_after_the_loss_or_weights_diverge():
    net = model()
    offered = []  # copies of the weights at each checkpoint offered
    t = Trainer(net, TRAIN, TEST, CFG, lr=1e12, seed=5, checkpoint_every=1)
    with pytest.raises(TrainingDiverged, match=r"epoch 1: the (training loss is (nan|inf)|weights are no longer)"):
        t.fit(on_checkpoint=lambda s: offered.append([p.detach().clone() for p in net.parameters()]))
    assert len(offered) < t.steps_per_epoch - 1  # it stopped inside the first epoch
    assert all(torch.isfinite(p).all() for weights in offered for p in weights)


def test_lr_and_epochs_default_to_the_config():
    t = Trainer(model(), TRAIN, TEST, CFG)
    assert (t.lr, t.epochs, t.optimizer.param_groups[0]["lr"]) == (CFG.lr, CFG.epochs, CFG.lr)
    assert t.penalized == []  # nothing named, nothing regularized
    assert len(t.fit()) == CFG.epochs and t.fit() == []  # done is done
