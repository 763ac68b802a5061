r"""Ground truth: exact and Monte-Carlo Shapley values of the *real* step.

Everything here re-runs the optimizer step for coalitions of the batch; no
approximation of the optimizer is made. It is slow (one optimizer update and
one validation forward pass per coalition) and meant for checking the
estimators of this library on small batches.

For a training step with parameters ``w``, optimizer state ``s`` (held fixed)
and per-example gradients ``grad l_i(w)`` of a batch of ``B`` examples, the
utility of a coalition ``S`` is

.. math::

    U(S) = L(w) - L(w + u(g_S)), \qquad
    g_S = c \sum_{i \in S} \nabla \ell_i(w), \qquad
    u(g) = \texttt{tx.update}(g, s, w)[0],

with ``c = 1/B`` (``"mean"``) or ``1`` (``"sum"``),

where ``L(w)`` is the mean validation loss. ``B`` is always the *full* batch
size: removing a player does not rescale the others. Positive ``U`` means the
validation loss went down (helpful). In-Run Data Shapley (Wang et al. 2024)
reports loss *changes*, where negative is helpful: flip the sign to compare.

Precision: utilities are differences of validation losses (``~1e-4``) of
losses of size ``~1``; float32 rounding (``~1e-7`` relative) is then visible
in Shapley values, which are differences of utilities again. All functions
therefore run in float64 by default (``dtype=jnp.float64``): they enable
JAX's 64-bit mode locally (see :func:`enable_x64`), cast the floating leaves
of params, gradients and optimizer state to float64 (integer leaves such as
Adam's ``count`` are kept), and so run the model inside ``val_loss`` in
float64 (Flax modules with ``dtype=None`` compute in the params' dtype;
float32 data closed over by ``val_loss`` is promoted). Pass ``dtype=None`` to
leave all dtypes and the global 64-bit flag alone. The cast cannot restore
digits lost earlier: float64 NumPy inputs go in as they are, while
``jnp.asarray`` outside 64-bit mode would round them to float32 first.

Example::

  >>> import jax, jax.numpy as jnp, optax
  >>> from optax_shapley import truth
  >>> params = {"w": jnp.array([1.0, -2.0])}
  >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  >>> loss = lambda p, x: 0.5 * (x @ p["w"]) ** 2          # f32[B]
  >>> val_loss = lambda p: (x @ p["w"]) ** 2                 # f32[V]
  >>> tx = optax.adam(1e-2)
  >>> grads = truth.per_example_grads(loss, params, x)      # leaves [B, ...]
  >>> u = truth.step_utility(tx, tx.init(params), params, grads, val_loss)
  >>> phi = truth.exact_shapley(u, 3)                       # f64[3]
  >>> gap = phi.sum() - (float(u(jnp.ones(3))) - float(u(jnp.zeros(3))))
  >>> bool(abs(gap) < 1e-12)   # efficiency
  True
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_shapley import shapley
from optax_shapley.utility import (Utility, enable_x64, per_example_grads,
                                   precision, step_utility)

__all__ = [
    "enable_x64",
    "per_example_grads",
    "step_utility",
    "exact_shapley",
    "monte_carlo_shapley",
    "leave_one_out",
    "efficiency_gap",
    "MAX_EXACT_PLAYERS",
]

#: Largest batch for which :func:`exact_shapley` enumerates all subsets.
MAX_EXACT_PLAYERS = 16


# ---------------------------------------------------------------------------
# Shapley values of a utility


def _evaluate(utility: Utility, masks: np.ndarray, chunk_size: int, dtype) -> np.ndarray:
  """``utility`` on each row of ``masks`` [M, n], vmapped in chunks; f64 numpy."""
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
  with precision(dtype):
    m = jnp.asarray(masks, dtype if dtype is not None else jnp.float32)
    batch = min(int(chunk_size), int(masks.shape[0]))
    if getattr(utility, "vectorized", False):
      # A compiled batched utility (step_utility): feed it fixed-size chunks
      # so every step of a run reuses one program; the last chunk is padded.
      out = []
      for start in range(0, m.shape[0], batch):
        chunk = m[start:start + batch]
        pad = batch - chunk.shape[0]
        if pad:
          chunk = jnp.concatenate([chunk, jnp.zeros((pad,) + chunk.shape[1:],
                                                    chunk.dtype)])
        out.append(np.asarray(utility(chunk), dtype=np.float64)[:batch - pad])
      return np.concatenate(out).reshape(masks.shape[0])
    fn = jax.jit(lambda xs: jax.lax.map(utility, xs, batch_size=batch))
    values = fn(m)
    return np.asarray(values, dtype=np.float64).reshape(masks.shape[0])


def exact_shapley(
    utility: Utility,
    num_players: int,
    *,
    chunk_size: int = 256,
    dtype: Any = jnp.float64,
) -> np.ndarray:
  """Exact Shapley values by enumerating all ``2^n`` coalitions.

  ``phi_i = sum_{S not containing i} |S|! (n-|S|-1)! / n! (U(S+i) - U(S))``.
  The utility is evaluated on all ``2^n`` masks with ``jax.vmap`` inside
  ``jax.lax.map(..., batch_size=chunk_size)`` (bounded memory); the weighted
  sum is formed in float64 NumPy. Efficiency holds:
  ``sum_i phi_i = U(all) - U(empty)``.

  Args:
    utility: ``utility(mask: f[n]) -> f[]``, traceable (e.g. from
      :func:`step_utility`).
    num_players: ``n``, at most :data:`MAX_EXACT_PLAYERS` (16).
    chunk_size: coalitions evaluated at once.
    dtype: dtype of the masks; float64 enables 64-bit mode around the whole
      evaluation. Use the ``dtype`` the utility was built with.

  Returns:
    ``f64[n]`` NumPy array of Shapley values.

  Raises:
    ValueError: ``num_players < 1`` or ``> 16`` (``2^n`` utility evaluations,
      each a full optimizer step and validation pass, become infeasible; use
      :func:`monte_carlo_shapley`).

  Example:
    Any traceable utility of a mask works. For ``U(S) = (sum_{i in S}
    a_i)^2`` the Shapley value of player ``i`` is ``a_i * sum(a)``:

    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from optax_shapley import truth
    >>> a = jnp.array([1.0, 2.0, 3.0])
    >>> utility = lambda mask: jnp.dot(mask, a) ** 2
    >>> phi = truth.exact_shapley(utility, 3)
    >>> print(np.round(phi, 6))
    [ 6. 12. 18.]
    >>> float(phi.sum())   # efficiency: U(all) - U(empty) = 36
    36.0
  """
  n = int(num_players)
  if n < 1:
    raise ValueError(f"num_players must be >= 1, got {n}.")
  if n > MAX_EXACT_PLAYERS:
    raise ValueError(
        f"exact_shapley enumerates all 2^n coalitions; n={n} > "
        f"{MAX_EXACT_PLAYERS} would need {2**n} optimizer steps. "
        "Use monte_carlo_shapley instead."
    )
  masks = shapley.subset_masks(n)
  return shapley.exact_values(
      _evaluate(utility, masks.astype(np.float64), chunk_size, dtype))


def monte_carlo_shapley(
    utility: Utility,
    num_players: int,
    key: jax.Array,
    num_permutations: int = 200,
    antithetic: bool = True,
    *,
    chunk_size: int = 256,
    dtype: Any = jnp.float64,
) -> tuple[np.ndarray, np.ndarray]:
  """Shapley values by permutation sampling, with standard errors.

  For a permutation ``pi``, player ``pi[k]`` gets ``U(pi[:k+1]) - U(pi[:k])``;
  the estimate is the mean over permutations. All prefix coalitions of all
  permutations are evaluated in one vectorised pass (``U(empty)`` and
  ``U(all)`` once), so each permutation costs ``n - 1`` utility calls. Every
  permutation's contributions sum to ``U(all) - U(empty)``, so the estimate
  is exactly efficient.

  With ``antithetic=True`` permutations come in pairs ``(pi, reversed pi)``;
  the pair's average is one sample for the standard error.

  Args:
    utility: ``utility(mask: f[n]) -> f[]``, traceable.
    num_players: ``n``.
    key: a ``jax.random`` key for the permutations.
    num_permutations: permutations evaluated in total (pairs count twice);
      must be even when ``antithetic``.
    antithetic: pair each permutation with its reverse.
    chunk_size: coalitions evaluated at once.
    dtype: dtype of the masks; float64 enables 64-bit mode around the
      evaluation.

  Returns:
    ``(values, stderr)``, both ``f64[n]`` NumPy arrays; ``stderr`` is the
    standard deviation of the samples (``ddof=1``) over ``sqrt(#samples)``,
    NaN with a single sample.

  Raises:
    ValueError: ``num_players < 1``, ``num_permutations < 1``, or odd
      ``num_permutations`` with ``antithetic``.

  Example:
    For ``U(S) = (sum_{i in S} a_i)^2`` every antithetic pair of
    permutations averages to the exact values ``a_i * sum(a)``, so the
    standard error is 0:

    >>> import jax
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from optax_shapley import truth
    >>> a = jnp.array([1.0, 2.0, 3.0])
    >>> utility = lambda mask: jnp.dot(mask, a) ** 2
    >>> values, stderr = truth.monte_carlo_shapley(
    ...     utility, 3, jax.random.key(0), num_permutations=20)
    >>> print(np.round(values, 6), np.round(stderr, 6))
    [ 6. 12. 18.] [0. 0. 0.]
  """
  n = int(num_players)
  p = int(num_permutations)
  if n < 1:
    raise ValueError(f"num_players must be >= 1, got {n}.")
  if p < 1:
    raise ValueError(f"num_permutations must be >= 1, got {p}.")
  if antithetic and p % 2:
    raise ValueError(
        f"num_permutations counts both members of an antithetic pair and must "
        f"be even when antithetic=True; got {p}."
    )
  num_draws = p // 2 if antithetic else p
  ranks = np.argsort(np.asarray(shapley.permutations(key, p, n, antithetic)),
                     axis=1)  # ranks[q, j]: position of player j
  prefixes = shapley.prefix_masks(ranks).astype(np.float64)
  masks = np.concatenate(
      [np.zeros((1, n)), np.ones((1, n)), prefixes.reshape(-1, n)], axis=0
  )
  u = _evaluate(utility, masks, chunk_size, dtype)
  contrib = shapley.permutation_marginals(
      ranks, u[2:].reshape(p, n - 1), u[0], u[1])  # [p, n], per player
  samples = contrib.reshape(num_draws, 2, n).mean(axis=1) if antithetic else contrib
  values = samples.mean(axis=0)
  if num_draws < 2:
    stderr = np.full(n, np.nan)
  else:
    stderr = samples.std(axis=0, ddof=1) / np.sqrt(num_draws)
  return values, stderr


def leave_one_out(
    utility: Utility,
    num_players: int,
    *,
    chunk_size: int = 256,
    dtype: Any = jnp.float64,
) -> np.ndarray:
  """Leave-one-out values ``lambda_i = U(all) - U(all minus {i})``.

  Args:
    utility: ``utility(mask: f[n]) -> f[]``, traceable.
    num_players: ``n``.
    chunk_size: coalitions evaluated at once.
    dtype: dtype of the masks; float64 enables 64-bit mode.

  Returns:
    ``f64[n]`` NumPy array.

  Raises:
    ValueError: ``num_players < 1``.

  Example:
    For ``U(S) = (sum_{i in S} a_i)^2``, leave-one-out is
    ``2 a_i sum(a) - a_i^2``; unlike Shapley values it does not sum to
    ``U(all) - U(empty) = 36``:

    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from optax_shapley import truth
    >>> a = jnp.array([1.0, 2.0, 3.0])
    >>> utility = lambda mask: jnp.dot(mask, a) ** 2
    >>> print(np.round(truth.leave_one_out(utility, 3), 6))
    [11. 20. 27.]
  """
  n = int(num_players)
  if n < 1:
    raise ValueError(f"num_players must be >= 1, got {n}.")
  masks = np.concatenate([np.ones((1, n)), 1.0 - np.eye(n)], axis=0)
  u = _evaluate(utility, masks, chunk_size, dtype)
  return u[0] - u[1:]


def efficiency_gap(
    utility: Utility,
    values: Any,
    *,
    dtype: Any = jnp.float64,
) -> float:
  """``sum_i values_i - (U(all) - U(empty))``; zero for Shapley values.

  Args:
    utility: ``utility(mask: f[n]) -> f[]``.
    values: ``f[n]`` candidate values (``n`` taken from its length).
    dtype: dtype of the masks; float64 enables 64-bit mode.

  Returns:
    The gap as a Python float (float64 arithmetic).

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_shapley import truth
    >>> a = jnp.array([1.0, 2.0, 3.0])
    >>> utility = lambda mask: jnp.dot(mask, a) ** 2
    >>> truth.efficiency_gap(utility, truth.exact_shapley(utility, 3))
    0.0
    >>> truth.efficiency_gap(utility, truth.leave_one_out(utility, 3))
    22.0
  """
  values = np.asarray(values, dtype=np.float64)
  n = values.shape[-1]
  u = _evaluate(utility, np.stack([np.zeros(n), np.ones(n)]), 2, dtype)
  return float(values.sum() - (u[1] - u[0]))
