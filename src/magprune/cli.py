"""CLI room: the ``magprune`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import magprune


def _demo(args: argparse.Namespace) -> int:
    from magprune.demo import run_demo

    run_demo(q=args.q, rounds=args.rounds, epochs=args.epochs, retrain_epochs=args.retrain_epochs, seed=args.seed)
    return 0


def _load_run(run_dir: Path):
    """The pruned model of a run directory (config.yaml, model.safetensors, masks.safetensors), masks applied."""
    import torch
    import yaml
    from safetensors.torch import load_file

    for needed in ("config.yaml", "model.safetensors"):
        if not (run_dir / needed).is_file():
            raise SystemExit(f"magprune: {run_dir / needed} not found (RUN_DIR must hold config.yaml and "
                             "model.safetensors)")
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    spec = config.get("model") if isinstance(config, dict) else None
    if not isinstance(spec, dict) or "name" not in spec:
        raise SystemExit(f"magprune: {run_dir / 'config.yaml'} has no 'model: {{name: ..., kwargs: ...}}' section")
    kwargs = dict(spec.get("kwargs") or {})
    model = magprune.create_model(spec["name"], **kwargs)
    model.load_state_dict(load_file(run_dir / "model.safetensors"), strict=True)
    if (run_dir / "masks.safetensors").is_file():
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, keep in load_file(run_dir / "masks.safetensors").items():
                if name not in params or params[name].shape != keep.shape:
                    raise SystemExit(f"magprune: mask {name!r} does not fit the model's parameters")
                params[name].mul_(keep.to(params[name].dtype))
    return model.eval(), spec["name"], kwargs


def _export(args: argparse.Namespace) -> int:
    import json

    from safetensors.torch import save

    from magprune.shrink import shrink
    from magprune.sparse import _atomic_write, format_size_report, save_compressed, size_report

    run_dir = Path(args.run_dir)
    model, name, kwargs = _load_run(run_dir)
    meta = {"model": json.dumps({"name": name, "kwargs": kwargs})}
    if args.format == "compressed":
        out = Path(args.out or run_dir / "model.compressed.safetensors")
        save_compressed(model, out, metadata=meta)
        print(format_size_report(size_report(model), out.stat().st_size))
    else:
        out = Path(args.out or run_dir / "model.shrunk.safetensors")
        small = shrink(model)
        _atomic_write(out, save({k: v.contiguous() for k, v in small.state_dict().items()},
                                metadata={"format": "magprune-shrunk", **meta}))
        before = sum(p.numel() for p in model.parameters())
        after = sum(p.numel() for p in small.parameters())
        print(f"shrunk {name}: {before:,} -> {after:,} parameters")
        for layer, module in small.named_modules():
            if hasattr(module, "weight") and module.weight is not None:
                print(f"  {layer}: {tuple(module.weight.shape)}")
    print(f"wrote {out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import json

    from safetensors import safe_open

    from magprune.shrink import resize_to
    from magprune.sparse import bench_model, format_bench, load_compressed

    path = Path(args.model_file)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as error:
        raise SystemExit(f"magprune: cannot read {path}: {error}") from error
    if "model" not in metadata:
        raise SystemExit(f"magprune: {path} does not say which model it holds (write it with 'magprune export')")
    spec = json.loads(metadata["model"])
    model = magprune.create_model(spec["name"], **spec["kwargs"])
    if metadata.get("format") == "magprune-shrunk":
        from safetensors.torch import load_file

        resize_to(model, load_file(path))
    else:
        model.load_state_dict(load_compressed(path), strict=True)
    if args.input_shape:
        shape = tuple(int(s) for s in args.input_shape.split(","))
    else:
        first = next(m for m in model.modules() if hasattr(m, "weight") and m.weight is not None and m.weight.ndim > 1)
        shape = (first.in_features,) if first.weight.ndim == 2 else (first.in_channels, 28, 28)
    batches = tuple(int(b) for b in args.batch_sizes.split(","))
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
    export = commands.add_parser("export", help="write a run's pruned model compressed or shrunk",
                                 description="Export RUN_DIR (config.yaml, model.safetensors, masks.safetensors) "
                                 "as a compressed sparse file or as a smaller dense (shrunk) model.")
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--format", choices=["compressed", "shrunk"], required=True)
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
    if args.command is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
