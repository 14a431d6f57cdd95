"""Crash safety and hostile inputs: real subprocesses killed with SIGKILL, resumed, compared bit for bit."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits-tiny.yaml"


def magprune(args, cwd, **env):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "magprune", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=300)


def outcome(run_dir: Path):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("seconds")
    return load_file(run_dir / "model.safetensors"), load_file(run_dir / "masks.safetensors"), rows


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("reference")
    done = magprune(["run", str(CONFIG), "--out", "ref", "--no-progress"], cwd)
    assert done.returncode == 0, done.stderr
    return outcome(cwd / "ref")


# dense: 3 epochs; step 1: prune + 2 retrain epochs; step 2: prune + 1 retrain epoch
KILL_POINTS = [
    "mid-save",        # inside the very first checkpoint write: nothing complete yet, resume starts over
    "batch:0:2:7",     # mid-epoch during dense training
    "saved:0:3",       # dense training done, before the first prune
    "pruned:1",        # right after a prune, before its checkpoint
    "saved:1:0",       # between a prune and its retraining
    "batch:1:2:3",     # mid-epoch during retraining
    "saved:2:1",       # the last epoch done, before the final files
]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_then_resume_gives_the_uninterrupted_result(point, reference, tmp_path):
    killed = magprune(["run", str(CONFIG), "--out", "run", "--no-progress"], tmp_path, MAGPRUNE_CRASH_AT=point)
    assert killed.returncode == -9, (point, killed.stderr[-500:])  # really killed, by SIGKILL
    assert not (tmp_path / "run" / "summary.json").exists()
    assert not list((tmp_path / "run").rglob("*.tmp")) or point == "mid-save"
    resumed = magprune(["run", "--resume", "run", "--no-progress"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    weights, masks, rows = outcome(tmp_path / "run")
    ref_weights, ref_masks, ref_rows = reference
    assert rows == ref_rows
    for name in ref_weights:
        assert torch.equal(weights[name], ref_weights[name]), name
    for name in ref_masks:
        assert torch.equal(masks[name], ref_masks[name]), name


@pytest.mark.parametrize("point", ["batch:0:2:13", "saved:1:1:10"])
def test_step_checkpoints_resume_mid_epoch(point, reference, tmp_path):
    """output.checkpoint_every = 5: a kill mid-epoch resumes from the last 5-step checkpoint, not the epoch start."""
    args = ["run", str(CONFIG), "--out", "run", "--no-progress", "--set", "output.checkpoint_every=5"]
    killed = magprune(args, tmp_path, MAGPRUNE_CRASH_AT=point)
    assert killed.returncode == -9, killed.stderr[-500:]
    resumed = magprune(["run", "--resume", "run", "--no-progress"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert ", batch 10" in resumed.stdout
    weights, masks, rows = outcome(tmp_path / "run")
    ref_weights, ref_masks, ref_rows = reference
    assert rows == ref_rows
    assert all(torch.equal(weights[n], ref_weights[n]) for n in ref_weights)
    assert all(torch.equal(masks[n], ref_masks[n]) for n in ref_masks)


def test_a_second_run_on_the_same_directory_is_refused(tmp_path):
    from magprune.experiment.pipeline import lock_run_dir

    holder = lock_run_dir(tmp_path / "busy")
    try:
        second = magprune(["run", str(CONFIG), "--out", "busy", "--no-progress", "--force"], tmp_path)
    finally:
        holder.close()
    assert second.returncode == 2
    assert "in use by another magprune run" in second.stderr and "Traceback" not in second.stderr


def test_unusable_run_directory_is_reported_before_training(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    out = magprune(["run", str(CONFIG), "--out", "a-file/run", "--no-progress"], tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "a-file/run" in out.stderr and "epoch" not in out.stdout


def test_diverging_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path):
    out = magprune(["run", str(CONFIG), "--out", "nan", "--no-progress", "--set", "train.lr=1e9",
                    "--set", "train.regularization=none"], tmp_path)
    assert out.returncode == 1, out.stderr
    assert "training loss is" in out.stderr and "Traceback" not in out.stderr
    checkpoint = tmp_path / "nan" / "checkpoints" / "resume.pt"
    if checkpoint.exists():  # epochs before the divergence were good: their checkpoint is intact and finite
        state = torch.load(checkpoint, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values())


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_crafted_pickle_checkpoint_is_refused_without_running_it(tmp_path):
    done = magprune(["run", str(CONFIG), "--out", "run", "--no-progress", "--set", "prune=[]",
                     "--set", "train.epochs=1"], tmp_path)
    assert done.returncode == 0, done.stderr
    (tmp_path / "run" / "checkpoints" / "resume.pt").write_bytes(pickle.dumps({"version": 1, "x": _Payload()}))
    out = magprune(["run", "--resume", "run", "--no-progress"], tmp_path)
    assert out.returncode == 2 and "not a readable magprune checkpoint" in out.stderr
    assert "resume.pt" in out.stderr
    assert not (tmp_path / "PWNED").exists()


def test_a_truncated_checkpoint_is_refused(tmp_path):
    done = magprune(["run", str(CONFIG), "--out", "run", "--no-progress", "--set", "train.epochs=1"], tmp_path)
    assert done.returncode == 0, done.stderr
    path = tmp_path / "run" / "checkpoints" / "resume.pt"
    path.write_bytes(path.read_bytes()[:1000])
    out = magprune(["run", "--resume", "run", "--no-progress"], tmp_path)
    assert out.returncode == 2 and "not a readable magprune checkpoint" in out.stderr


def test_resume_needs_a_run_directory(tmp_path):
    out = magprune(["run", "--resume", "nowhere", "--no-progress"], tmp_path)
    assert out.returncode == 2 and "holds no config.yaml" in out.stderr


def test_corrupt_or_foreign_model_files_are_refused_by_name(tmp_path):
    done = magprune(["run", str(CONFIG), "--out", "run", "--no-progress", "--set", "train.epochs=1",
                     "--set", "prune=[]"], tmp_path)
    assert done.returncode == 0, done.stderr
    model_file = tmp_path / "run" / "model.safetensors"
    good = model_file.read_bytes()
    model_file.write_bytes(good[: len(good) // 2])
    out = magprune(["export", "run", "--format", "compressed"], tmp_path)
    assert out.returncode == 2 and "model.safetensors" in out.stderr and "Traceback" not in out.stderr
    model_file.write_bytes(good)
    config = tmp_path / "run" / "config.yaml"
    config.write_text(config.read_text().replace("in_features: 64", "in_features: 100"))
    out = magprune(["export", "run", "--format", "compressed"], tmp_path)
    assert out.returncode == 2 and "cannot be loaded into lenet-300-100" in out.stderr and "size mismatch" in out.stderr
