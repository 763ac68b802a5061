"""optax_shapley: in-run data Shapley values for JAX/Flax training with Adam.

Which training examples helped or hurt the validation loss, measured while the
model trains (Ding, Zhang, Wang, Hu 2026, "In-Run Data Shapley for
Adam Optimizer"; Wang et al. 2024, "Data Shapley in One Training Run").
Sign convention: a positive value means the example lowered the validation
loss (helpful).
"""

from optax_shapley.capture import value_grad_and_factors
from optax_shapley.contraction import contract
from optax_shapley.factors import Factors
from optax_shapley.layers import UnsupportedModuleError
from optax_shapley.progress import Progress
from optax_shapley.stream import ValueWriter, reduce_values
from optax_shapley.targets import class_targets, mean_target
from optax_shapley.state import ShapleyState
from optax_shapley.table import state_partition_specs
from optax_shapley.transform import (
    adam,
    adamw,
    check,
    sgd,
    step_values,
    values,
    with_shapley,
)

__version__ = "0.1.0"

__all__ = [
    "Factors",
    "Progress",
    "ShapleyState",
    "UnsupportedModuleError",
    "ValueWriter",
    "adam",
    "adamw",
    "check",
    "class_targets",
    "contract",
    "mean_target",
    "reduce_values",
    "sgd",
    "state_partition_specs",
    "step_values",
    "value_grad_and_factors",
    "values",
    "with_shapley",
]
