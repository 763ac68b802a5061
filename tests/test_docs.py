"""The API reference (docs/api/*.rst) documents every public name.

`make docs` fails on a broken reference, but not on a name that is missing
from the reference; this test does.
"""

import pathlib
import re

import optax_shapley
from optax_shapley import truth

API = pathlib.Path(__file__).resolve().parent.parent / "docs" / "api"


def _documented(page: str) -> set[str]:
  text = (API / page).read_text()
  return set(re.findall(r"^\.\. (?:auto\w+|py:\w+):: (\w+)\s*$", text, re.M))


def test_every_public_name_is_in_the_api_reference():
  missing = set(optax_shapley.__all__) - _documented("optax_shapley.rst")
  assert not missing, f"add to docs/api/optax_shapley.rst: {sorted(missing)}"


def test_every_public_name_of_truth_is_in_its_page():
  missing = set(truth.__all__) - _documented("truth.rst")
  assert not missing, f"add to docs/api/truth.rst: {sorted(missing)}"
