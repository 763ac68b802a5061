"""`optax-shapley bench` runs in a tiny configuration and reports what it
promises.  Wall-time targets are checked by the benchmark, not here."""

import json

from optax_shapley import cli
from optax_shapley.experiments import bench


def test_bench_reports_every_mode(tmp_path):
  cfg = bench.BenchConfig(models=("mlp", "transformer"), val_sizes=(4,),
                          batch_size=16, text_batch_size=4, seq_len=8,
                          hidden=16, rounds=2, train_steps=2)
  report = bench.run_bench(cfg, out_dir=str(tmp_path), verbose=False)
  assert [r["model"] for r in report["results"]] == ["mlp", "transformer"]
  for r in report["results"]:
    assert set(r["modes"]) == set(bench.MODES)
    assert r["modes"]["plain"]["throughput_vs_plain"] == 1.0
    for row in r["modes"].values():
      assert row["median_ms"] > 0 and row["compile_s"] > 0
  loaded = json.loads((tmp_path / "bench.json").read_text())
  assert loaded["results"][0]["limit"] == 16 / 20
  assert "| mlp | 4 |" in (tmp_path / "table.md").read_text()


def test_cli_bench_default_modes_are_all_modes():
  args = cli.build_parser().parse_args(["bench"])
  assert args.modes == ",".join(bench.MODES)


def test_cli_bench_adds_plain(tmp_path, capsys):
  assert cli.main(["bench", "--models", "mlp", "--val-sizes", "4",
                   "--modes", "exact", "--batch-size", "8", "--rounds", "1",
                   "--out", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "plain" in out and "exact" in out
