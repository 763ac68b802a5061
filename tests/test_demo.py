"""End-to-end check of the noisy-label demo on a tiny configuration."""

import csv
import json

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from optax_shapley.experiments.demo import (  # noqa: E402
    ESTIMATORS, per_class_auroc, run_demo)

COLUMNS = ["id", "given_label", "true_label", "flipped"] + [
    f"{m}_{e}" for m, e in ESTIMATORS]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo")
  summary = run_demo(out_dir=str(out), seed=0, epochs=4, batch_size=32,
                     noise=0.2, progress=False, verbose=False)
  return out, summary


def test_files_exist(demo):
  out, summary = demo
  for name in ("values.csv", "values.png", "lowest.png", "summary.json"):
    path = out / name
    assert path.is_file() and path.stat().st_size > 0, name
  with open(out / "summary.json") as f:
    assert json.load(f)["auroc"] == summary["auroc"]


def test_csv_columns_and_rows(demo):
  out, summary = demo
  with open(out / "values.csv", newline="") as f:
    rows = list(csv.reader(f))
  assert rows[0] == COLUMNS
  body = rows[1:]
  n = summary["num_train"]
  assert len(body) == n
  assert [int(r[0]) for r in body] == list(range(n))
  given = np.array([int(r[1]) for r in body])
  true = np.array([int(r[2]) for r in body])
  flipped = np.array([int(r[3]) for r in body], bool)
  np.testing.assert_array_equal(flipped, given != true)
  assert flipped.sum() == round(0.2 * n) == summary["num_flipped"]
  vals = np.array([[float(v) for v in r[4:]] for r in body])
  assert vals.shape == (n, len(ESTIMATORS))
  assert np.all(np.isfinite(vals))
  # Every estimator credited someone: no column is identically zero.
  assert np.all(np.abs(vals).max(axis=0) > 0)


def test_default_estimator_detects_flipped_labels(demo):
  _, summary = demo
  default = f"{ESTIMATORS[0][0]}_{ESTIMATORS[0][1]}"
  assert summary["auroc"][default] > 0.5, summary["auroc"]
  assert summary["test_accuracy"] > 0.5, summary["test_accuracy"]


def test_default_is_auto_and_summary_keys(demo):
  _, summary = demo
  assert ESTIMATORS[0] == ("auto", "midpoint")
  assert summary["default"] == "auto_midpoint"
  assert set(summary["per_class_auroc"]) == set(summary["auroc"])
  assert set(summary["flipped_in_lowest"]) == {f"{m}_{e}" for m, e in ESTIMATORS}


def test_per_class_auroc_ignores_class_offsets():
  # Flipped examples score higher than clean ones within each class, but
  # class 1 scores higher overall: the per-class AUROC is 1, the overall not.
  classes = np.array([0, 0, 0, 1, 1, 1])
  flipped = np.array([0, 0, 1, 0, 0, 1], bool)
  score = np.array([0.0, 1.0, 2.0, 10.0, 11.0, 12.0])
  assert per_class_auroc(flipped, score, classes) == 1.0
  # A class without flipped examples is skipped.
  assert per_class_auroc(flipped[:3], score[:3], classes[:3]) == 1.0
  assert np.isnan(per_class_auroc(np.zeros(3, bool), score[:3], classes[:3]))
