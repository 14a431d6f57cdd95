"""CLI room: the ``magprune`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import magprune


def _demo(args: argparse.Namespace) -> int:
    from magprune.demo import run_demo

    run_demo(q=args.q, rounds=args.rounds, epochs=args.epochs, retrain_epochs=args.retrain_epochs, seed=args.seed)
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
