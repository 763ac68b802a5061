"""Moved to :mod:`optax_shapley.experiments.models`; this alias keeps old imports
working for one release."""

import sys
import warnings

from optax_shapley.experiments import models as _moved

warnings.warn("optax_shapley.models moved to optax_shapley.experiments.models",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
