import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from in_process import run_cli
from safetensors.torch import load_file, save_file

import magprune
from magprune.deploy import load_compressed
from magprune.deploy.shrink import resize_to

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "magprune.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.fixture
def run_dir(tmp_path):
    torch.manual_seed(0)
    model = magprune.create_model("lenet-300-100")
    pruner = magprune.Pruner(model)
    pruner.prune(magprune.LayerSparsity({"fc1": 0.97, "fc2": 0.97, "fc3": 0.8}))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "lenet-300-100", "kwargs": {}}}))
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    save_file(pruner.state_dict()["masks"], tmp_path / "masks.safetensors")
    return tmp_path, model.eval()


def test_export_compressed_and_shrunk_then_bench(run_dir):
    path, model = run_dir
    done = _cli("export", str(path), "--format", "compressed")  # the real entry point once, then in process
    assert done.returncode == 0, done.stderr
    assert "total" in done.stdout
    state = load_compressed(path / "model.compressed.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value)

    out = path / "small.safetensors"
    done = run_cli("export", str(path), "--format", "shrunk", "--out", str(out))
    assert done.returncode == 0, done.stderr
    small = resize_to(magprune.create_model("lenet-300-100"), load_file(out)).eval()
    assert small.fc1.out_features < 300
    x = torch.randn(4, 784)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))

    done = run_cli("bench", str(path / "model.compressed.safetensors"), "--batch-sizes", "1,4", "--repeats", "1")
    assert done.returncode == 0, done.stderr
    assert "fc1" in done.stdout and "(whole model)" in done.stdout

    # damaged files: one line naming the file and what is wrong, exit status 2, no traceback
    data = (path / "model.compressed.safetensors").read_bytes()
    flipped = bytearray(data)
    flipped[-20] ^= 0xFF
    (path / "flipped.safetensors").write_bytes(bytes(flipped))
    (path / "truncated.safetensors").write_bytes(data[:200])
    for name, why in (("flipped", "checksum"), ("truncated", "cannot read")):
        done = run_cli("bench", str(path / f"{name}.safetensors"), "--batch-sizes", "1", "--repeats", "1")
        assert done.returncode == 2, done.stderr
        assert why in done.stderr and f"{name}.safetensors" in done.stderr and "Traceback" not in done.stderr
    good = str(path / "model.compressed.safetensors")
    for args, why in ((["--batch-sizes", "0"], "--batch-sizes"), (["--batch-sizes", "a"], "--batch-sizes"),
                      (["--input-shape", "3,3"], "does not fit"), (["--repeats", "0"], "--repeats")):
        done = run_cli("bench", good, *args)
        assert done.returncode == 2 and why in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_export_refuses_a_bad_run_dir(tmp_path):
    done = run_cli("export", str(tmp_path), "--format", "compressed")
    assert done.returncode != 0 and "config.yaml" in done.stderr


def test_export_to_a_place_that_cannot_be_written_is_one_line(run_dir):
    path, _ = run_dir
    blocker = path / "a-file"
    blocker.write_text("not a directory")
    done = run_cli("export", str(path), "--format", "compressed", "--out", str(blocker / "m.safetensors"))
    assert done.returncode == 2, done.stderr
    assert f"{blocker / 'm.safetensors'}: cannot write there" in done.stderr and "Traceback" not in done.stderr
