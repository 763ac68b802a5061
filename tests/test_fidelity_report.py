"""`optax-shapley fidelity` in small configurations, with asserted thresholds.

The full report (three models, steps up to 1001) is a command, not a test;
docs/fidelity.md holds its output.
"""

import json
import os

import numpy as np
import pytest

from optax_shapley import cli
from optax_shapley.experiments import fidelity as F


@pytest.fixture(scope="module")
def mlp_report(tmp_path_factory):
  out = tmp_path_factory.mktemp("fidelity")
  cfg = F.Config(models=("mlp",), steps=(1, 3, 6), accumulate_examples=20,
                 accumulate_epochs=2)
  return F.run_fidelity(cfg, out_dir=str(out), verbose=False), out


def _r(report, step, name, truth="shapley"):
  (res,) = report["models"]
  (s,) = [s for s in res["steps"] if s["step"] == step]
  return s["estimators"][name][f"pearson_{truth}"]


def test_writes_json_table_and_plot(mlp_report):
  report, out = mlp_report
  for f in ("fidelity.json", "table.md", "fidelity.png"):
    assert os.path.getsize(out / f) > 0
  with open(out / "fidelity.json") as fh:
    loaded = json.load(fh)
  assert loaded["estimators"] == [F.estimator_name(m, e) for m, e in F.ESTIMATORS]
  step = loaded["models"][0]["steps"][0]
  assert step["truth"] == "exact" and len(step["shapley"]) == 10
  # The exact Shapley values are efficient: they sum to U(B) - U(empty).
  np.testing.assert_allclose(sum(step["shapley"]), step["whole_effect"],
                             rtol=1e-8, atol=1e-12)
  assert "secant@midpoint" in (out / "table.md").read_text()


def test_default_estimator_and_references_meet_their_targets(mlp_report):
  report, _ = mlp_report
  for t in (3, 6):
    assert _r(report, t, "secant@midpoint") >= 0.999
  for t in (1, 3, 6):
    assert _r(report, t, "auto@midpoint") >= 0.999
  for t in (1, 3, 6):   # the per-example-gradient references, step 1 included
    assert _r(report, t, "coalitions@midpoint") >= 0.999
    assert _r(report, t, "removal@end", "loo") >= 0.999
  # The paper's finding: SGD-style values fit the Adam step worse.
  assert _r(report, 6, "sgd@start") < _r(report, 6, "secant@midpoint")
  acc = report["models"][0]["accumulated"]
  assert acc["epochs"] == 2 and acc["steps"] == 4
  assert acc["coalitions@midpoint"]["pearson"] >= 0.999
  # The default credits Adam's sign-descent steps exactly, which lifts its
  # accumulated values above the secant's.
  auto = acc["auto@midpoint"]
  assert acc["exact_steps"] >= 1
  assert auto["pearson"] >= 0.99 and abs(auto["slope"] - 1) <= 0.05
  assert auto["pearson"] > acc["secant@midpoint"]["pearson"]


def test_monte_carlo_truth_beyond_12_players():
  cfg = F.Config(models=("mlp",), steps=(3,), batch_size=14, val_size=40,
                 accumulate_epochs=0, target_se=0.05, max_permutations=600)
  report = F.run_fidelity(cfg, out_dir=None, verbose=False)
  (s,) = report["models"][0]["steps"]
  assert s["truth"] == "monte_carlo" and s["permutations"] >= 100
  assert s["shapley_se_over_spread"] <= 0.05 or s["permutations"] >= 600
  assert s["estimators"]["secant@midpoint"]["pearson_shapley"] >= 0.99


def test_forced_monte_carlo_agrees_with_exact():
  """--truth monte_carlo at B = 10: the permutation estimate is within a few
  standard errors of exact enumeration (same step, same utility)."""
  kw = dict(models=("mlp",), steps=(3,), accumulate_epochs=0, val_size=40)
  ex = F.run_fidelity(F.Config(**kw), out_dir=None, verbose=False)
  mc = F.run_fidelity(F.Config(truth="monte_carlo", target_se=0.02, **kw),
                      out_dir=None, verbose=False)
  (e,), (m,) = ex["models"][0]["steps"], mc["models"][0]["steps"]
  assert m["truth"] == "monte_carlo"
  exact, sampled = np.array(e["shapley"]), np.array(m["shapley"])
  spread = exact.std()
  assert np.abs(sampled - exact).max() <= 5 * m["shapley_se_over_spread"] * spread + 1e-12


def test_cli_rejects_unknown_model():
  with pytest.raises(ValueError, match="unknown model"):
    cli.main(["fidelity", "--models", "resnet", "--out", "unused"])
