"""Crash safety and hostile inputs: real subprocesses killed with SIGKILL, resumed, compared bit for bit; refused
inputs checked through the same main() in process."""

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from in_process import run_cli
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits-tiny.yaml"


ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def magprune(args, cwd):
    return subprocess.run([sys.executable, "-m", "magprune", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)


def outcome(run_dir: Path):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("seconds")
    return load_file(run_dir / "model.safetensors"), load_file(run_dir / "masks.safetensors"), rows


# ---------------------------------------------------------------- killing a real run from outside

def _listing(directory: Path) -> frozenset:
    try:
        return frozenset((entry.name, entry.inode()) for entry in os.scandir(directory))
    except FileNotFoundError:
        return frozenset()


def _frozen(proc: subprocess.Popen) -> bool:
    """Wait until SIGSTOP has stopped every thread of ``proc``; False if it exited first."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            states = {(task / "stat").read_text().rsplit(")", 1)[1].split()[0]
                      for task in Path(f"/proc/{proc.pid}/task").iterdir()}
        except FileNotFoundError:  # a thread (or the process) went away while we looked
            states = set()
        if states and states <= {"T", "t"}:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.0002)
    raise AssertionError(f"process {proc.pid} did not stop")


def kill_when(args, cwd: Path, run_dir: Path, wanted, delay: float = 0.0):
    """Run ``magprune ARGS`` and watch RUN_DIR/checkpoints from outside. Each time its files change, freeze the
    process (SIGSTOP) and ask ``wanted(run_dir)``; when it says yes, SIGKILL the process there (after letting it run
    on for ``delay`` seconds, if given). Returns the exit status and the output."""
    log = cwd / f"{run_dir.name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "magprune", *args], cwd=cwd, env=ENV, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        seen = frozenset()
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if _listing(run_dir / "checkpoints") == seen:
                time.sleep(0.0005)
                continue
            os.kill(proc.pid, signal.SIGSTOP)
            if not _frozen(proc):
                break
            seen = _listing(run_dir / "checkpoints")
            if wanted(run_dir):
                if delay:
                    os.kill(proc.pid, signal.SIGCONT)
                    time.sleep(delay)
                os.kill(proc.pid, signal.SIGKILL)
                break
            os.kill(proc.pid, signal.SIGCONT)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, log.read_text()


def mid_save(run_dir: Path) -> bool:
    """A resume checkpoint is being written: its temp file exists, the rename has not happened."""
    return any((run_dir / "checkpoints").glob(".resume.pt.*.tmp"))


def checkpoint_at(run_dir: Path):
    """Where the last complete checkpoint of a run stands, or None before the first: (stage, epoch, batch) with
    epoch -1 for a stage not started and 0 for a prune step pruned but not retrained, and the resume message."""
    path = run_dir / "checkpoints" / "resume.pt"
    try:
        with open(path, "rb") as f:  # one file even if the run replaces it meanwhile
            saved = torch.load(f, weights_only=True)
    except FileNotFoundError:
        return None
    index, state = saved["position"]["stage"], saved["position"]["state"]
    if index == len(saved["stages"]):
        return ("end", -1, 0), "at the end (every stage done)"
    name = saved["stages"][index]
    train = (state or {}).get("train")
    if train is None:
        return (name, -1 if state is None else 0, 0), f"at {name}\n"
    where = f"after epoch {train['epoch']}" + (f", batch {train['batch']}" if train["batch"] else "")
    return (name, train["epoch"], train["batch"]), f"at {name}, {where}\n"


# every checkpoint of digits-tiny in run order (dense: 3 epochs; step 1: prune + 2 epochs; step 2: prune + 1 epoch)
STAGES = ["dense", "step-1", "step-2", "end"]
CHECKPOINTS = [("dense", 1, 0), ("dense", 2, 0), ("dense", 3, 0), ("step-1", -1, 0), ("step-1", 0, 0),
               ("step-1", 1, 0), ("step-1", 2, 0), ("step-2", -1, 0), ("step-2", 0, 0), ("step-2", 1, 0),
               ("end", -1, 0)]


def order(where):
    return (STAGES.index(where[0]), *where[1:])


def reached(target):
    """``wanted`` for kill_when: the last complete checkpoint on disk is at ``target`` or later."""
    def wanted(run_dir: Path) -> bool:
        now = checkpoint_at(run_dir)
        return now is not None and order(now[0]) >= order(target)
    return wanted


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("reference")
    done = magprune(["run", str(CONFIG), "--out", "ref", "--no-progress"], cwd)
    assert done.returncode == 0, done.stderr
    return outcome(cwd / "ref")


def assert_resume_gives_the_reference(tmp_path, reference, killed):
    """``killed`` = (exit status, output) of the killed run: resume it, compare with the uninterrupted run; returns
    where the checkpoint it resumed from stood."""
    status, output = killed
    assert status == -signal.SIGKILL, output[-500:]  # really killed from outside, by SIGKILL
    run_dir = tmp_path / "run"
    assert not (run_dir / "summary.json").exists()
    at = checkpoint_at(run_dir)
    resumed = magprune(["run", "--resume", "run", "--no-progress"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    if at is not None:  # the resume starts from the checkpoint on disk, and says so
        assert f"resuming run {at[1]}" in resumed.stdout, (at, resumed.stdout[:500])
    else:
        assert "resuming" not in resumed.stdout  # nothing complete yet: starts over
    weights, masks, rows = outcome(run_dir)
    ref_weights, ref_masks, ref_rows = reference
    assert rows == ref_rows
    assert weights.keys() == ref_weights.keys() and masks.keys() == ref_masks.keys()
    for name in ref_weights:
        assert torch.equal(weights[name], ref_weights[name]), name
    for name in ref_masks:
        assert torch.equal(masks[name], ref_masks[name]), name
    return at and at[0]


RUN = ["run", str(CONFIG), "--out", "run", "--no-progress"]

KILL_AT = {
    "mid-epoch in dense training": ("dense", 1, 0),  # killed just after epoch 1's checkpoint: epoch 2 is redone
    "dense done, before the first prune": ("step-1", -1, 0),
    "between a prune and its retraining": ("step-1", 0, 0),
    "mid-epoch in retraining": ("step-1", 1, 0),
    "every stage done, before the final files": ("end", -1, 0),
}


@pytest.mark.parametrize("target", KILL_AT.values(), ids=KILL_AT.keys())
def test_sigkill_at_a_checkpoint_then_resume_gives_the_uninterrupted_result(target, reference, tmp_path):
    killed = kill_when(RUN, tmp_path, tmp_path / "run", reached(target))
    at = assert_resume_gives_the_reference(tmp_path, reference, killed)
    assert order(at) >= order(target)


def test_sigkill_inside_a_checkpoint_write_then_resume(reference, tmp_path):
    """Killed while resume.pt's temp file is written and not yet renamed: the last complete checkpoint (or none, if
    it was the first) is intact, the stale temp file is ignored."""
    killed = kill_when(RUN, tmp_path, tmp_path / "run", mid_save)
    assert list((tmp_path / "run" / "checkpoints").glob(".resume.pt.*.tmp"))  # the kill landed inside the write
    assert_resume_gives_the_reference(tmp_path, reference, killed)


@pytest.mark.parametrize("seed", [1])
def test_sigkill_at_a_random_moment_then_resume(seed, reference, tmp_path):
    """A random checkpoint of the run, then a random delay (up to 0.1 s: an epoch or two) before the SIGKILL."""
    rng = random.Random(seed)
    target, delay = rng.choice(CHECKPOINTS), rng.uniform(0.0, 0.1)
    killed = kill_when(RUN, tmp_path, tmp_path / "run", reached(target), delay=delay)
    assert_resume_gives_the_reference(tmp_path, reference, killed)


@pytest.mark.parametrize("target", [("dense", 0, 10), ("step-1", 1, 10)], ids=["dense", "retraining"])
def test_step_checkpoints_resume_mid_epoch(target, reference, tmp_path):
    """output.checkpoint_every = 5: a kill mid-epoch resumes from the last 5-step checkpoint, not the epoch start."""
    killed = kill_when([*RUN, "--set", "output.checkpoint_every=5"], tmp_path, tmp_path / "run", reached(target))
    at = assert_resume_gives_the_reference(tmp_path, reference, killed)
    assert order(at) >= order(target) and at[2] > 0  # resumed mid-epoch


SPARSE = ["--set", "prune.0.retrain.compute=sparse", "--set", "prune.1.retrain.compute=sparse"]


def test_sparse_retraining_killed_mid_epoch_resumes_exactly(tmp_path):
    """Retraining with sparse compute: a kill between two 5-step checkpoints resumes to the uninterrupted sparse
    run's weights, masks and metrics, bit for bit (the checkpoints hold the plain model and the optimizer state of
    the compact weights)."""
    done = magprune(["run", str(CONFIG), "--out", "ref", "--no-progress", *SPARSE], tmp_path)
    assert done.returncode == 0, done.stderr
    reference = outcome(tmp_path / "ref")
    killed = kill_when([*RUN, *SPARSE, "--set", "output.checkpoint_every=5"], tmp_path, tmp_path / "run",
                       reached(("step-1", 1, 10)))
    at = assert_resume_gives_the_reference(tmp_path, reference, killed)
    assert order(at) >= order(("step-1", 1, 10)) and at[0] in ("step-1", "step-2")


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
    out = run_cli("run", str(CONFIG), "--out", "a-file/run", "--no-progress", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "a-file/run" in out.stderr and "epoch" not in out.stdout


@pytest.mark.parametrize("every", [0, 5])
def test_diverging_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(every, tmp_path):
    """Dense training is fine, the first retraining diverges (lr x 1e10): exit 1 with a message, and the resume
    checkpoint on disk is from before the divergence — finite, pruned, usable: resuming from it diverges the same
    way. With checkpoint_every, no checkpoint inside the diverging epoch may hold NaN weights (it used to)."""
    args = ["run", str(CONFIG), "--out", "nan", "--no-progress", "--set", "prune.0.retrain.lr_fraction=1e10",
            "--set", f"output.checkpoint_every={every}"]
    out = run_cli(*args, cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    message = "retrain-1 epoch 1: the training loss is nan"
    assert message in out.stderr and "Traceback" not in out.stderr
    run_dir = tmp_path / "nan"
    (stage, epoch, _), _ = checkpoint_at(run_dir)
    assert (stage, epoch) == ("step-1", 0)  # pruned, the retraining's first epoch not finished
    state = torch.load(run_dir / "checkpoints" / "resume.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert all(not state["model"][name][~mask].any() for name, mask in state["masks"].items())
    stages = [json.loads(line)["stage"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert stages == ["dense"] * 3 + ["prune-1"]  # the diverged epoch is not logged
    again = run_cli("run", "--resume", "nan", "--no-progress", cwd=tmp_path)
    assert again.returncode == 1 and message in again.stderr and "resuming nan at step-1" in again.stdout


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_crafted_pickle_checkpoint_is_refused_without_running_it(tmp_path):
    done = run_cli("run", str(CONFIG), "--out", "run", "--no-progress", "--set", "prune=[]",
                     "--set", "train.epochs=1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (tmp_path / "run" / "checkpoints" / "resume.pt").write_bytes(pickle.dumps({"version": 1, "x": _Payload()}))
    out = run_cli("run", "--resume", "run", "--no-progress", cwd=tmp_path)
    assert out.returncode == 2 and "not a readable magprune checkpoint" in out.stderr
    assert "resume.pt" in out.stderr
    assert not (tmp_path / "PWNED").exists()


def test_a_truncated_checkpoint_is_refused(tmp_path):
    done = run_cli("run", str(CONFIG), "--out", "run", "--no-progress", "--set", "train.epochs=1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    path = tmp_path / "run" / "checkpoints" / "resume.pt"
    path.write_bytes(path.read_bytes()[:1000])
    out = run_cli("run", "--resume", "run", "--no-progress", cwd=tmp_path)
    assert out.returncode == 2 and "not a readable magprune checkpoint" in out.stderr


def test_resume_needs_a_run_directory(tmp_path):
    out = run_cli("run", "--resume", "nowhere", "--no-progress", cwd=tmp_path)
    assert out.returncode == 2 and "holds no config.yaml" in out.stderr


def test_corrupt_or_foreign_model_files_are_refused_by_name(tmp_path):
    done = run_cli("run", str(CONFIG), "--out", "run", "--no-progress", "--set", "train.epochs=1",
                     "--set", "prune=[]", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    model_file = tmp_path / "run" / "model.safetensors"
    good = model_file.read_bytes()
    model_file.write_bytes(good[: len(good) // 2])
    out = run_cli("export", "run", "--format", "compressed", cwd=tmp_path)
    assert out.returncode == 2 and "model.safetensors" in out.stderr and "Traceback" not in out.stderr
    model_file.write_bytes(good)
    config = tmp_path / "run" / "config.yaml"
    config.write_text(config.read_text().replace("in_features: 64", "in_features: 100"))
    out = run_cli("export", "run", "--format", "compressed", cwd=tmp_path)
    assert out.returncode == 2 and "cannot be loaded into lenet-300-100" in out.stderr and "size mismatch" in out.stderr
