"""CLI room: the ``magprune`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import magprune


def _demo(args: argparse.Namespace) -> int:
    from magprune.experiment.demo import check_demo_arguments, run_demo

    try:  # all checked before any training
        check_demo_arguments(q=args.q, rounds=args.rounds, epochs=args.epochs, retrain_epochs=args.retrain_epochs,
                             seed=args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    run_demo(q=args.q, rounds=args.rounds, epochs=args.epochs, retrain_epochs=args.retrain_epochs, seed=args.seed)
    return 0


def _run(args: argparse.Namespace) -> int:
    import torch.distributed

    from magprune.experiment import distributed
    from magprune.experiment.config import load_config
    from magprune.experiment.pipeline import run_experiment

    if args.resume:
        if args.config or args.set:
            raise UsageError("--resume RUN_DIR continues a run with its own config.yaml: give no CONFIG or --set")
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise UsageError(f"cannot resume {run_dir}: it holds no config.yaml (not a run directory)")
        config = load_config(run_dir / "config.yaml")
    else:
        if not args.config:
            raise UsageError("give a CONFIG to run, or --resume RUN_DIR")
        config = load_config(args.config, args.set)
        run_dir = Path(args.out or config.output.dir or Path("runs") / Path(args.config).stem)
    if args.seeds is not None:
        return _run_seeds(args, config, run_dir)
    # Under torchrun every rank runs this; all must have checked the directory before rank 0 starts writing.
    distributed.init_from_env()
    try:
        if not args.resume and (run_dir / "config.yaml").exists() and not args.force:
            raise UsageError(f"run directory {run_dir} already holds a run; pass --force to overwrite or --out "
                             "elsewhere")
        if distributed.is_distributed():
            torch.distributed.barrier()
        run_experiment(config, run_dir, data_dir=args.data_dir, progress=not args.no_progress,
                       resume=bool(args.resume))
        if distributed.is_distributed():
            # every rank done before any tears the process group down: a rank still finishing a collective while
            # another destroyed the group aborted in gloo's teardown ("terminate called without an active exception")
            torch.distributed.barrier()
    finally:
        distributed.cleanup()
    return 0


def _run_seeds(args: argparse.Namespace, config, out: Path) -> int:
    import shlex

    from magprune.experiment import distributed
    from magprune.experiment.seeds import parse_seeds, run_seeds

    if args.resume:
        raise UsageError("--seeds continues by itself: rerun the same command (finished seeds are read back, "
                         "interrupted ones resume); --resume takes one run directory")
    if distributed.is_distributed():
        raise UsageError("--seeds runs the seeds one after another in one process; under torchrun run each seed "
                         "with --set seed=N")
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    command = "magprune " + " ".join(shlex.quote(a) for a in args.argv)
    run_seeds(config, out, seeds, data_dir=args.data_dir, progress=not args.no_progress, force=args.force,
              command=command)
    return 0


def _report(args: argparse.Namespace) -> int:
    import json

    from magprune.experiment.pipeline import render_report

    seeds = Path(args.run_dir) / "seeds.json"
    if seeds.is_file():
        from magprune.experiment.seeds import render_seeds

        print(render_seeds(json.loads(seeds.read_text())))
        return 0
    summary = Path(args.run_dir) / "summary.json"
    if not summary.is_file():
        raise UsageError(f"{args.run_dir} is not a finished run directory: summary.json is missing")
    print(render_report(json.loads(summary.read_text())))
    return 0


def _grid(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise UsageError(f"--grid must be comma-separated numbers in [0, 1), got {text!r}") from exc


def _sensitivity(args: argparse.Namespace) -> int:
    from magprune.experiment.config import load_config
    from magprune.experiment.runs import dense_model_of_run, run_sensitivity, train_dense

    source = Path(args.source)
    if source.is_dir():
        if args.set:
            raise UsageError("--set applies to a CONFIG, not to a run directory")
        model, config = dense_model_of_run(source)
        out = Path(args.out or source / "sensitivity")
    elif source.is_file():
        config = load_config(source, args.set)
        model = train_dense(config, args.data_dir, progress=not args.no_progress)
        out = Path(args.out or Path("runs") / f"{source.stem}-sensitivity")
    else:
        raise UsageError(f"{source} is neither a run directory nor a config file")
    if not 0 <= args.max_drop < 100:
        raise UsageError(f"--max-drop is in percentage points, in [0, 100), got {args.max_drop}")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    try:
        run_sensitivity(model, config, out, data_dir=args.data_dir, grid=_grid(args.grid),
                        max_drop=args.max_drop / 100, workers=args.workers, progress=not args.no_progress)
    except ValueError as exc:  # a bad grid value, named by the scan's validation
        if type(exc) is not ValueError:
            raise
        raise UsageError(str(exc)) from exc
    return 0


def _tradeoff(args: argparse.Namespace) -> int:
    from magprune.experiment.config import load_config
    from magprune.experiment.runs import run_tradeoff

    config = load_config(args.config, args.set)
    out = Path(args.out or Path("runs") / f"{Path(args.config).stem}-tradeoff")
    try:
        run_tradeoff(config, out, data_dir=args.data_dir, grid=_grid(args.grid), progress=not args.no_progress)
    except ValueError as exc:
        if type(exc) is not ValueError:
            raise
        raise UsageError(str(exc)) from exc
    return 0


class UsageError(ValueError):
    """Bad input from the command line: reported in one line, exit status 2."""


def _load_run(run_dir: Path):
    """The pruned model of a run directory, masks applied, with its registry name and constructor kwargs."""
    import torch

    from magprune.experiment.pipeline import load_run

    try:
        model, masks, config = load_run(run_dir)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from exc
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, keep in masks.items():
            if name not in params or params[name].shape != keep.shape:
                raise UsageError(f"{run_dir / 'masks.safetensors'}: mask {name!r} does not fit the model's "
                                 "parameters")
            params[name].mul_(keep.to(params[name].dtype))
    return model.eval(), config.model.name, dict(config.model.kwargs)


def _export(args: argparse.Namespace) -> int:
    import json

    from safetensors.torch import save

    from magprune.deploy.format import (
        format_shared_table,
        format_size_report,
        save_compressed,
        shared_rows,
        size_report_from_params,
    )
    from magprune.deploy.shrink import shrink
    from magprune.fileio import write_atomic

    run_dir = Path(args.run_dir)
    model, name, kwargs = _load_run(run_dir)
    meta = {"model": json.dumps({"name": name, "kwargs": kwargs})}
    if args.format == "compressed":
        out = Path(args.out or run_dir / "model.compressed.safetensors")
        params = save_compressed(model, out, metadata=meta)
        print(format_size_report(size_report_from_params(params), out.stat().st_size))
    elif args.format == "quantized":
        out = Path(args.out or run_dir / "model.quantized.safetensors")
        _share_if_needed(model, args.bits)
        params = save_compressed(model, out, metadata=meta)
        print(format_shared_table(shared_rows(params), out.stat().st_size))
    else:
        out = Path(args.out or run_dir / "model.shrunk.safetensors")
        small = shrink(model)
        write_atomic(out, save({k: v.contiguous() for k, v in small.state_dict().items()},
                                metadata={"format": "magprune-shrunk", **meta}))
        before = sum(p.numel() for p in model.parameters())
        after = sum(p.numel() for p in small.parameters())
        print(f"shrunk {name}: {before:,} -> {after:,} parameters")
        for layer, module in small.named_modules():
            if hasattr(module, "weight") and module.weight is not None:
                print(f"  {layer}: {tuple(module.weight.shape)}")
    print(f"wrote {out}")
    return 0


def _share_if_needed(model, bits_text: str | None) -> None:
    """Share the weights of a run not yet quantized (k-means, no fine-tuning), as ``--bits`` says."""
    from magprune.deploy.entropy import shared_values
    from magprune.deploy.quantize import WeightSharing
    from magprune.targets import select_parameters

    params = select_parameters(model, None)
    if bits_text is None and all(shared_values(p.detach().numpy()) is not None for p in params.values()):
        return  # already shared (a run with a quantize stage)
    bits = parse_bits(bits_text or "conv=8,fc=5")
    try:
        sharing = WeightSharing(model, bits=bits)
    except ValueError as error:
        raise UsageError(f"--bits: {error}") from error
    print(f"shared the weights without fine-tuning ({sharing}); a quantize stage fine-tunes them")


def parse_bits(text: str) -> int | dict[str, int]:
    """``--bits``: one integer for every layer, or ``key=bits`` pairs (keys: parameter or module names, conv, fc)."""
    try:
        if "=" not in text:
            return int(text)
        pairs = [part.split("=", 1) for part in text.split(",")]
        return {key.strip(): int(value) for key, value in pairs}
    except ValueError:
        raise UsageError(f"--bits must be an integer or comma-separated KEY=BITS pairs (e.g. conv=8,fc=5), "
                         f"got {text!r}") from None


def _positive_ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise UsageError(f"{option} must be comma-separated integers >= 1, got {text!r}")
    return values


def _bench(args: argparse.Namespace) -> int:
    import json

    import torch
    from safetensors import safe_open

    from magprune.deploy.bench import bench_model, format_bench
    from magprune.deploy.format import CompressedFormatError, load_compressed
    from magprune.deploy.shrink import resize_to

    path = Path(args.model_file)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for missing, truncated or garbled files
        raise UsageError(f"cannot read {path}: {error}") from error
    if "model" not in metadata:
        raise UsageError(f"{path} does not say which model it holds (write it with 'magprune export')")
    try:
        spec = json.loads(metadata["model"])
        model = magprune.create_model(spec["name"], **spec["kwargs"])
    except (ValueError, TypeError, KeyError) as error:  # JSONDecodeError is a ValueError
        raise UsageError(f"{path}: its 'model' metadata {metadata['model'][:200]!r} does not name a registered "
                         f"model with its arguments ({type(error).__name__}: {error})") from error
    try:
        if metadata.get("format") == "magprune-shrunk":
            from safetensors.torch import load_file

            resize_to(model, load_file(path))
        else:
            model.load_state_dict(load_compressed(path), strict=True)
    except (RuntimeError, ValueError, KeyError) as error:
        if isinstance(error, CompressedFormatError):
            raise
        raise UsageError(f"{path}: its tensors do not fit {spec['name']} "
                         f"({' '.join(str(error).split())[:300]})") from error
    if args.input_shape:
        shape = _positive_ints(args.input_shape, "--input-shape")
    else:
        first = next(m for m in model.modules() if hasattr(m, "weight") and m.weight is not None and m.weight.ndim > 1)
        shape = (first.in_features,) if first.weight.ndim == 2 else (first.in_channels, 28, 28)
    batches = _positive_ints(args.batch_sizes, "--batch-sizes")
    if args.repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {args.repeats}")
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *shape))
    except RuntimeError as error:
        raise UsageError(f"an input of shape {list(shape)} does not fit {spec['name']} ({error}); "
                         "give the per-example shape with --input-shape") from error
    print(f"{spec['name']} from {path}, input {shape}; best of {args.repeats} runs")
    print(format_bench(bench_model(model.eval(), shape, batches, repeats=args.repeats)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="magprune",
        description="Han et al. 2015 magnitude pruning for PyTorch: train, prune, retrain.",
    )
    parser.add_argument("--version", action="version", version=f"magprune {magprune.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser("demo", help="train, prune and retrain a small MLP on the bundled digits set",
                               description="Train a 64-256-128-10 MLP on scikit-learn's bundled digits, prune it "
                               "Han's way (threshold q x std per layer), retrain, and print the per-layer table.")
    demo.add_argument("--q", type=float, default=1.0, help="quality parameter: threshold = q x std (default 1.0)")
    demo.add_argument("--rounds", type=int, default=2, help="prune-and-retrain rounds (default 2)")
    demo.add_argument("--epochs", type=int, default=40, help="dense training epochs (default 40)")
    demo.add_argument("--retrain-epochs", type=int, default=20, help="retraining epochs per round (default 20)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(func=_demo)

    run = commands.add_parser("run", help="train, prune and retrain as an experiment config says",
                              description="Run Han et al.'s train -> prune -> retrain pipeline from a YAML config "
                              "and write a run directory (config, metrics, checkpoints, model, masks, report.md).")
    run.add_argument("config", nargs="?", help="YAML experiment config (see configs/)")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue an interrupted run from its last complete checkpoint (same final metrics)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value by dotted key, e.g. --set train.epochs=2 --set prune.0.q=1.2")
    run.add_argument("--out", metavar="RUN_DIR", help="run directory (default: output.dir or runs/<config name>)")
    run.add_argument("--data-dir", metavar="DIR",
                     help="directory with the IDX files (default: data.dir, else $MAGPRUNE_DATA)")
    run.add_argument("--seeds", metavar="LIST",
                     help="run the config once per seed (e.g. 0,1,2 or 0-4) into RUN_DIR/seed-N and write "
                     "RUN_DIR/seeds.json and seeds.md (each seed, mean ± std, median); rerun to continue")
    run.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(func=_run)

    report = commands.add_parser("report", help="print the report of a finished run directory",
                                 description="Print report.md of a run: the Table 1 row and the per-layer table.")
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.set_defaults(func=_report)

    sens = commands.add_parser("sensitivity", help="prune one layer at a time, plot accuracy, recommend targets",
                               description="Han et al.'s sensitivity analysis (Fig. 6): prune each layer alone over "
                               "a grid of sparsities, no retraining; write sensitivity.csv/.json/.png and a "
                               "recommended.yaml prune step for an accuracy-drop budget.")
    sens.add_argument("source", metavar="RUN_DIR|CONFIG",
                      help="a run directory (its dense checkpoint is scanned) or a config (trained dense first)")
    sens.add_argument("--grid", default=",".join(str(g) for g in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8,
                                                                      0.9, 0.95, 0.98)),
                      help="comma-separated sparsities to try (default 0,0.1,...,0.9,0.95,0.98)")
    sens.add_argument("--max-drop", type=float, default=0.5,
                      help="accuracy drop budget in percentage points for the recommendation (default 0.5)")
    sens.add_argument("--workers", type=int, default=0, help="worker processes for the evaluations (default 0)")
    sens.add_argument("--out", metavar="DIR", help="output directory (default RUN_DIR/sensitivity)")
    sens.add_argument("--data-dir", metavar="DIR", help="directory with the IDX files")
    sens.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    sens.add_argument("--no-progress", action="store_true", help="no progress bars")
    sens.set_defaults(func=_sensitivity)

    trade = commands.add_parser("tradeoff", help="accuracy loss vs parameters pruned: L1/L2, +/- retraining",
                                description="Han et al.'s Fig. 5 for a config: dense with L1 and with L2, each "
                                "pruned along the grid with and without retraining, plus iterative L2; writes "
                                "tradeoff.csv/.json/.png.")
    trade.add_argument("config", metavar="CONFIG")
    trade.add_argument("--grid", default="0.5,0.7,0.8,0.9,0.95", help="comma-separated sparsities")
    trade.add_argument("--out", metavar="DIR", help="output directory (default runs/<config>-tradeoff)")
    trade.add_argument("--data-dir", metavar="DIR", help="directory with the IDX files")
    trade.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    trade.add_argument("--no-progress", action="store_true", help="no progress bars")
    trade.set_defaults(func=_tradeoff)

    export = commands.add_parser("export", help="write a run's pruned model compressed or shrunk",
                                 description="Export RUN_DIR (config.yaml, model.safetensors, masks.safetensors) "
                                 "as a compressed sparse file or as a smaller dense (shrunk) model.")
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--format", choices=["compressed", "quantized", "shrunk"], required=True,
                        help="compressed: sparse (format v3); quantized: the same file after Deep Compression's "
                        "weight sharing, with its per-layer table; shrunk: a smaller dense model")
    export.add_argument("--bits", metavar="BITS", help="quantized: bits per shared value for a run not quantized "
                        "yet, an integer or KEY=BITS pairs like conv=8,fc=5 (default conv=8,fc=5, Han's LeNet-5 "
                        "setting); a run whose weights are shared already is written as it is")
    export.add_argument("--out", metavar="FILE", help="output file (default RUN_DIR/model.<format>.safetensors)")
    export.set_defaults(func=_export)
    bench = commands.add_parser("bench", help="latency and throughput, dense vs sparse, per layer",
                                description="Time every Linear/Conv2d layer and the whole model dense vs sparse.")
    bench.add_argument("model_file", metavar="MODEL_FILE", help="a file written by 'magprune export'")
    bench.add_argument("--batch-sizes", default="1,32,256", help="comma-separated (default 1,32,256)")
    bench.add_argument("--input-shape", help="per-example input shape, e.g. 1,28,28 (default: from the first layer;"
                       " 28x28 images for conv nets)")
    bench.add_argument("--repeats", type=int, default=10, help="timed runs per measurement, best kept (default 10)")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # seeds.md records the command that made it
    if args.command is None:
        parser.print_help()
        return 2
    from magprune.deploy.format import CompressedFormatError
    from magprune.experiment.config import ConfigError
    from magprune.experiment.data import DataError
    from magprune.experiment.pipeline import RunError
    from magprune.experiment.train import TrainingDiverged

    try:
        return args.func(args)
    except (ConfigError, DataError, UsageError, RunError, CompressedFormatError) as exc:
        print(f"magprune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an output path that cannot be written, a file that vanished: one line, not a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"magprune {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"magprune {args.command}: stopped: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
