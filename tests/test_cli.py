import re
import subprocess
import sys
from pathlib import Path

import magprune
from magprune.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert magprune.__version__ in capsys.readouterr().out


def test_demo_runs_end_to_end_on_digits(capsys):
    assert main(["demo", "--epochs", "4", "--retrain-epochs", "2", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "dense:" in out and "round 1 pruned" in out and "round 1 retrain" in out
    assert re.search(r"fc1\s+16,384", out)
    accuracies = [float(a) for a in re.findall(r"test accuracy (\d+\.\d+)%", out)]
    assert len(accuracies) == 3 and accuracies[0] > 50  # four epochs learn digits well past chance (10%)


def test_entry_point_module_runs():
    out = subprocess.run([sys.executable, "-m", "magprune.cli", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, re.S)
    test_command = commands[1].strip()
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text()
