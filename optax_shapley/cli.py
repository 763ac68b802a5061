"""The ``optax-shapley`` command.

Subcommands:

  demo      noisy-label detection on scikit-learn digits (see
            :mod:`optax_shapley.experiments.demo`).
  fidelity  every estimator against exact Shapley and leave-one-out of the
            real Adam step on three bundled models (see
            :mod:`optax_shapley.experiments.fidelity`).
  bench     step time of the attributed step against the plain optax step
            (see :mod:`optax_shapley.experiments.bench`).
  detect    find corrupted training data by value, against baselines (see
            :mod:`optax_shapley.experiments.detect`).
  prune     remove the lowest-valued data, retrain, compare with random and
            the baselines (see :mod:`optax_shapley.experiments.prune`).
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


# optax_shapley.experiments.bench.MODES, without importing JAX for --help.
BENCH_MODES = "plain,exact,auto,ghost,bf16,naive"


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
                  "example (default estimator, the sgd baseline and the "
                  "coalition-sampling estimator), and "
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
  fid = sub.add_parser(
      "fidelity",
      help="every estimator against ground truth of the real Adam step",
      description="Train the bundled MLP, CNN and character transformer "
                  "with Adam; at chosen steps compare every estimator's step "
                  "values with exact (B <= 12) or Monte-Carlo Shapley values "
                  "and leave-one-out of the real optimizer step. Prints a "
                  "table per model, writes fidelity.json, table.md and "
                  "fidelity.png.")
  fid.add_argument("--models", default="mlp,cnn,transformer",
                   help="comma-separated subset of mlp,cnn,transformer "
                        "(default: %(default)s)")
  fid.add_argument("--steps", default="1,2,3,6,21,101,301,1001",
                   help="comma-separated 1-based steps to examine "
                        "(default: %(default)s)")
  fid.add_argument("--lr", type=float, default=1e-3,
                   help="Adam learning rate (default: %(default)s)")
  fid.add_argument("--b1", type=float, default=0.9,
                   help="Adam's first-moment decay (default: %(default)s)")
  fid.add_argument("--b2", type=float, default=0.999,
                   help="Adam's second-moment decay (default: %(default)s)")
  fid.add_argument("--weight-decay", type=float, default=None,
                   help="use AdamW with this weight decay")
  fid.add_argument("--clip", type=float, default=None,
                   help="global-norm clipping before Adam")
  fid.add_argument("--batch-size", type=_positive, default=10,
                   help="players per step; exact Shapley up to 12, "
                        "Monte-Carlo above (default: %(default)s)")
  fid.add_argument("--val-size", type=_positive, default=None,
                   help="validation examples (default: 100 images, 32 "
                        "sequences)")
  fid.add_argument("--seed", type=int, default=0,
                   help="seed of data, init and batches (default: %(default)s)")
  fid.add_argument("--accumulate-examples", type=_positive, default=100,
                   help="training examples of the whole run whose "
                        "accumulated values are checked against exact "
                        "per-step Shapley (default: %(default)s)")
  fid.add_argument("--accumulate-epochs", type=int, default=10,
                   help="epochs of that run; 0 skips it (default: "
                        "%(default)s)")
  fid.add_argument("--target-se", type=float, default=0.02,
                   help="Monte-Carlo stop: max standard error / spread "
                        "(default: %(default)s)")
  fid.add_argument("--truth", choices=("auto", "exact", "monte_carlo"),
                   default="auto",
                   help="Shapley ground truth: exact enumeration (B <= 16), "
                        "Monte-Carlo permutations, or auto = exact for "
                        "B <= 12 (default: %(default)s)")
  fid.add_argument("--out", default="runs/fidelity",
                   help="output folder (default: %(default)s)")
  bench = sub.add_parser(
      "bench",
      help="throughput of the attributed step against plain optax",
      description="Time the plain optax.adam step, the attributed step in "
                  "each contraction mode and the naive vmap(grad) baseline, "
                  "interleaved in one process; report throughput and memory "
                  "ratios. Writes bench.json and table.md.")
  bench.add_argument("--models", default="mlp,cnn,transformer",
                     help="comma-separated subset of mlp,cnn,transformer "
                          "(default: %(default)s)")
  bench.add_argument("--val-sizes", default="4,16,64",
                     help="validation sizes V (default: %(default)s)")
  bench.add_argument("--modes", default=BENCH_MODES,
                     help="comma-separated subset of "
                          f"{BENCH_MODES} (bf16: auto with the factors stored "
                          "in bfloat16) (default: %(default)s)")
  bench.add_argument("--batch-size", type=_positive, default=256,
                     help="B of the MLP and CNN (default: %(default)s)")
  bench.add_argument("--text-batch-size", type=_positive, default=64,
                     help="B of the transformer (default: %(default)s)")
  bench.add_argument("--seq-len", type=_positive, default=128,
                     help="T of the transformer (default: %(default)s)")
  bench.add_argument("--rounds", type=_positive, default=20,
                     help="timed rounds per mode, interleaved in random "
                          "order (default: %(default)s)")
  bench.add_argument("--out", default="runs/bench",
                     help="output folder (default: %(default)s)")
  for name, helptext, desc in (
      ("detect", "find corrupted training data by value",
       "Corrupt a share of a bundled dataset's training split, train an MLP "
       "with Adam once while valuing every example against the overall and "
       "per-class validation targets, and compare value-based scores with "
       "baselines (final loss and margin, summed loss, TracIn, random) by "
       "AUROC and precision. Writes scores.csv, roc.png, detect.json and "
       "table.md."),
      ("prune", "remove the lowest-valued data and retrain",
       "For each seed: one attributed run on corrupted data, then for each "
       "score and fraction remove the most (and the least) suspect examples, "
       "retrain from scratch, and report test accuracy against training on "
       "all data and random removal. Writes prune.json, table.md and "
       "prune.png.")):
    cmd = sub.add_parser(name, help=helptext, description=desc)
    cmd.add_argument("--dataset", default="digits",
                     choices=("digits", "breast_cancer", "wine"),
                     help="scikit-learn dataset (default: %(default)s)")
    cmd.add_argument("--corruption", default="flip", choices=("flip", "noise"),
                     help="flip labels, or replace inputs by Gaussian noise "
                          "(default: %(default)s)")
    cmd.add_argument("--fraction", type=_fraction, default=0.2,
                     help="share of training examples corrupted "
                          "(default: %(default)s)")
    cmd.add_argument("--epochs", type=_positive, default=60,
                     help="training epochs (default: %(default)s)")
    cmd.add_argument("--hidden", type=_positive, default=128,
                     help="hidden width of the MLP (default: %(default)s)")
    cmd.add_argument("--batch-size", type=_positive, default=32,
                     help="examples per step (default: %(default)s)")
    cmd.add_argument("--lr", type=float, default=3e-3,
                     help="Adam's learning rate (default: %(default)s)")
    cmd.add_argument("--out", default=f"runs/{name}",
                     help="output folder (default: %(default)s)")
    if name == "detect":
      cmd.add_argument("--seed", type=int, default=0,
                       help="seed of corruption, init and batches "
                            "(default: %(default)s)")
    else:
      cmd.add_argument("--seeds", default="0,1,2,3,4",
                       help="comma-separated seeds (default: %(default)s)")
      cmd.add_argument("--fractions", default="0.05,0.1,0.2,0.3",
                       help="fractions removed (default: %(default)s)")
  return parser


def _names(text: str) -> tuple[str, ...]:
  return tuple(x.strip() for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(x) for x in text.split(",") if x.strip())
  except ValueError:
    raise SystemExit(f"expected comma-separated integers, got {text!r}")


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.command == "demo":
    from optax_shapley.experiments.demo import run_demo
    run_demo(out_dir=args.out, seed=args.seed, epochs=args.epochs,
             batch_size=args.batch_size, noise=args.noise,
             progress=True)
    return 0
  if args.command == "fidelity":
    from optax_shapley.experiments import fidelity
    cfg = fidelity.Config(
        models=_names(args.models),
        steps=_ints(args.steps), learning_rate=args.lr, b1=args.b1, b2=args.b2,
        weight_decay=args.weight_decay, clip=args.clip,
        batch_size=args.batch_size, val_size=args.val_size, seed=args.seed,
        accumulate_examples=args.accumulate_examples,
        accumulate_epochs=args.accumulate_epochs, target_se=args.target_se,
        truth=args.truth)
    fidelity.run_fidelity(cfg, out_dir=args.out, progress=True)
    print(f"wrote {args.out}/fidelity.json, table.md, fidelity.png")
    return 0
  if args.command == "bench":
    from optax_shapley.experiments import bench
    modes = _names(args.modes)
    if "plain" not in modes:
      modes = ("plain",) + modes
    cfg = bench.BenchConfig(
        models=_names(args.models), val_sizes=_ints(args.val_sizes), modes=modes,
        batch_size=args.batch_size, text_batch_size=args.text_batch_size,
        seq_len=args.seq_len, rounds=args.rounds)
    bench.run_bench(cfg, out_dir=args.out)
    print(f"wrote {args.out}/bench.json, table.md")
    return 0
  if args.command in ("detect", "prune"):
    from optax_shapley.experiments import detect
    dcfg = detect.Config(
        dataset=args.dataset, corruption=args.corruption,
        fraction=args.fraction, epochs=args.epochs,
        batch_size=args.batch_size, learning_rate=args.lr,
        hidden=(args.hidden,),
        seed=getattr(args, "seed", 0))
    if args.command == "detect":
      detect.run_detect(dcfg, out_dir=args.out, progress=True)
      print(f"wrote {args.out}/scores.csv, roc.png, detect.json, table.md")
      return 0
    from optax_shapley.experiments import prune
    try:
      fractions = tuple(float(x) for x in args.fractions.split(",") if x.strip())
    except ValueError:
      raise SystemExit(f"expected comma-separated fractions, got {args.fractions!r}")
    prune.run_prune(prune.Config(detect=dcfg, fractions=fractions,
                                 seeds=_ints(args.seeds)),
                    out_dir=args.out, progress=True)
    print(f"wrote {args.out}/prune.json, table.md, prune.png")
    return 0
  return 2  # unreachable: argparse rejects unknown commands


if __name__ == "__main__":
  sys.exit(main())
