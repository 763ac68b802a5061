"""The scripts in examples/ run (shortened) and produce finite values."""

import importlib.util
import pathlib

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name):
  spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name, kwargs", [
    ("mlp_digits", dict(epochs=1)), ("char_transformer", dict(steps=20)),
    ("train_state", dict(epochs=1))])
def test_example_runs(name, kwargs, capsys):
  values = _load(name).main(**kwargs)
  assert np.all(np.isfinite(values)) and np.any(values != 0)
  assert "valuable" in capsys.readouterr().out
