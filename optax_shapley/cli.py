"""The ``optax-shapley`` command.

Subcommands:

  demo   noisy-label detection on scikit-learn digits (see
         :mod:`optax_shapley.experiments.demo`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

__all__ = ["main", "build_parser"]


def _fraction(text: str) -> float:
  value = float(text)
  if not 0.0 <= value <= 1.0:
    raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
  return value


def _positive(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
  return value


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="optax-shapley",
      description="In-run data Shapley values for JAX/Flax models trained "
                  "with Adam.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  sub.required = True
  demo = sub.add_parser(
      "demo",
      help="find flipped labels in scikit-learn digits by their value",
      description="Train a small MLP with Adam on scikit-learn digits with "
                  "a share of training labels flipped, value every training "
                  "example (default estimator and the sgd baseline), and "
                  "report how well low value detects the flipped labels.")
  demo.add_argument("--out", default="runs/demo",
                    help="output folder (default: %(default)s)")
  demo.add_argument("--seed", type=int, default=0,
                    help="seed of split, flips, init and batch order "
                         "(default: %(default)s)")
  demo.add_argument("--epochs", type=_positive, default=20,
                    help="training epochs (default: %(default)s)")
  demo.add_argument("--batch-size", type=_positive, default=32,
                    help="examples per step (default: %(default)s)")
  demo.add_argument("--noise", type=_fraction, default=0.2,
                    help="share of training labels flipped "
                         "(default: %(default)s)")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.command == "demo":
    from optax_shapley.experiments.demo import run_demo
    run_demo(out_dir=args.out, seed=args.seed, epochs=args.epochs,
             batch_size=args.batch_size, noise=args.noise,
             progress=True)
    return 0
  return 2  # unreachable: argparse rejects unknown commands


if __name__ == "__main__":
  sys.exit(main())
