"""Seeds room: a config over several seeds on the bundled digits (seed-N run directories, seeds.json/md, reruns)."""

import json
import statistics
from pathlib import Path

import pytest
import yaml

from magprune.cli import main
from magprune.experiment.seeds import aggregate, frontier, parse_seeds, seed_row, spread

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "digits-tiny.yaml"
FAST = ["--set", "train.epochs=1", "--set", "prune.0.retrain.epochs=1", "--no-progress"]


def test_parse_seeds_lists_and_ranges():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds("0-2,7,1") == [0, 1, 2, 7]
    for bad in ("", "a", "-1", "3-1", "1,,2"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)


def test_spread_is_mean_sample_std_and_median():
    s = spread([0.01, 0.02, 0.04])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.07 / 3) and s["median"] == 0.02
    assert s["std"] == pytest.approx(statistics.stdev([0.01, 0.02, 0.04]))
    assert spread([0.5])["std"] == 0.0
    rows = [seed_row(0, {"error_after": 0.1, "report": {}}), seed_row(1, {"error_after": 0.3, "report": {}})]
    assert aggregate(rows)["error_after"]["mean"] == pytest.approx(0.2)
    assert "validation_error_after" not in aggregate(rows)  # not measured: not aggregated


def test_frontier_is_the_median_per_step_over_the_seeds_that_reached_it():
    def summary(sparsities, errors):
        # an older run's summary: no compression recorded per step, so it comes from the sparsity
        return {"params_before": 110, "weights_before": 100, "report": {},
                "steps": [{"step": i + 1, "sparsity": s, "error_retrained": e}
                          for i, (s, e) in enumerate(zip(sparsities, errors, strict=True))]}
    rows = [seed_row(0, summary([0.5, 0.9], [0.01, 0.02])), seed_row(1, summary([0.5, 0.8], [0.03, 0.04])),
            seed_row(2, summary([0.5], [0.02]))]
    assert rows[0]["steps"][1]["compression"] == pytest.approx(110 / 20)
    points = frontier(rows)
    assert [p["n"] for p in points] == [3, 2]
    assert points[0]["compression"] == pytest.approx(110 / 60) and points[0]["error"] == pytest.approx(0.02)
    assert (points[1]["error_min"], points[1]["error_max"]) == (0.02, 0.04)
    assert points[1]["compression"] == pytest.approx(statistics.median([110 / 20, 110 / 30]))
    assert points[0]["validation_error"] is None
    assert frontier([seed_row(0, summary([0.5], [0.01]))]) == []  # one step is a point, not a curve


def test_run_seeds_writes_each_seed_and_their_spread(tmp_path, capsys):
    out = tmp_path / "seeds"
    assert main(["run", str(TINY), "--seeds", "0,1", "--out", str(out), *FAST]) == 0
    result = json.loads((out / "seeds.json").read_text())
    assert result["seeds"] == [0, 1] and [r["seed"] for r in result["rows"]] == [0, 1]
    summaries = [json.loads((out / f"seed-{s}" / "summary.json").read_text()) for s in (0, 1)]
    for seed, summary in zip((0, 1), summaries, strict=True):
        assert yaml.safe_load((out / f"seed-{seed}" / "config.yaml").read_text())["seed"] == seed
        assert summary["report"]["total"]["han_flops"] <= summary["report"]["total"]["remaining_flops"]
    errors = [s["error_after"] for s in summaries]
    assert result["spread"]["error_after"]["mean"] == pytest.approx(statistics.fmean(errors))
    assert result["spread"]["error_after"]["median"] == pytest.approx(statistics.median(errors))
    md = (out / "seeds.md").read_text()
    assert "| mean ± std |" in md and "| median |" in md and f"{100 * errors[1]:.2f}%" in md
    assert result["command"].startswith("magprune run ") and "--seeds 0,1" in result["command"]

    # the config prunes in two steps: each step's compression and error after retraining make the frontier
    for seed, summary in zip((0, 1), summaries, strict=True):
        steps = summary["steps"]
        assert steps[0]["compression"] < steps[1]["compression"]
        assert steps[-1]["compression"] == pytest.approx(summary["compression"], rel=1e-6)  # nothing else is zero
        assert [p["error"] for p in result["rows"][seed]["steps"]] == [st["error_retrained"] for st in steps]
    assert [p["step"] for p in result["frontier"]] == [1, 2] and all(p["n"] == 2 for p in result["frontier"])
    assert result["frontier"][1]["compression"] == pytest.approx(
        statistics.median(s["steps"][1]["compression"] for s in summaries))
    csv_lines = (out / "frontier.csv").read_text().splitlines()
    assert csv_lines[0] == "seed,step,compression,test_error,validation_error" and len(csv_lines) == 5
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Iterative frontier" in md

    # a rerun reads the finished seeds back instead of training again; `magprune report` prints the table
    mtime = (out / "seed-0" / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["run", str(TINY), "--seeds", "0,1", "--out", str(out), *FAST]) == 0
    assert "seed 0: finished run" in capsys.readouterr().out
    assert (out / "seed-0" / "summary.json").stat().st_mtime_ns == mtime
    assert main(["report", str(out)]) == 0
    assert "| mean ± std |" in capsys.readouterr().out


def test_run_seeds_refuses_a_seed_directory_of_another_config(tmp_path, capsys):
    out = tmp_path / "seeds"
    assert main(["run", str(TINY), "--seeds", "0", "--out", str(out), *FAST]) == 0
    capsys.readouterr()
    assert main(["run", str(TINY), "--seeds", "0", "--out", str(out), *FAST, "--set", "train.lr=0.01"]) == 2
    err = capsys.readouterr().err
    assert "seed-0 holds another run" in err and "'train'" in err and "--force" in err


def test_run_seeds_bad_list_is_a_usage_error(tmp_path, capsys):
    assert main(["run", str(TINY), "--seeds", "x", "--out", str(tmp_path / "o")]) == 2
    assert "--seeds must be" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_seed_placeholder_in_model_weights_starts_each_seed_from_its_own_model(tmp_path, capsys):
    dense = tmp_path / "dense"
    assert main(["run", str(TINY), "--seeds", "0,1", "--out", str(dense), "--set", "train.epochs=1", "--set",
                 "prune=[]", "--no-progress"]) == 0
    weights = str(dense / "seed-{seed}" / "checkpoints" / "dense.safetensors")
    out = tmp_path / "pruned"
    assert main(["run", str(TINY), "--seeds", "0,1", "--out", str(out), "--set", f"model.weights={weights}",
                 *FAST, "--set", "train.epochs=0"]) == 0
    result = json.loads((out / "seeds.json").read_text())
    started = [json.loads((dense / f"seed-{s}" / "summary.json").read_text())["error_after"] for s in (0, 1)]
    assert [r["error_before"] for r in result["rows"]] == started  # each seed from its own dense model
    assert started[0] != started[1]
    # one config for all the seeds: a rerun reads them back
    capsys.readouterr()
    assert main(["run", str(TINY), "--seeds", "0,1", "--out", str(out), "--set", f"model.weights={weights}",
                 *FAST, "--set", "train.epochs=0"]) == 0
    assert "seed 1: finished run" in capsys.readouterr().out
