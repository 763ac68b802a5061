"""Moved to :mod:`optax_shapley.experiments.data`; this alias keeps old imports
working for one release."""

import sys
import warnings

from optax_shapley.experiments import data as _moved

warnings.warn("optax_shapley.data moved to optax_shapley.experiments.data",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
