r"""Shapley values of a utility on coalitions: enumeration and permutations.

One implementation of the combinatorics, shared by the ground truth
(:mod:`optax_shapley.truth`, float64 NumPy around a compiled utility) and the
in-graph ``"coalitions"`` metric (:func:`optax_shapley.metrics.coalition_values`,
inside the training step).  For ``n`` players and a utility ``U`` on subsets
``S`` (Shapley 1953):

.. math::

    \phi_i = \sum_{S \subseteq N \setminus \{i\}}
             \frac{|S|!\,(n - |S| - 1)!}{n!} \bigl(U(S \cup \{i\}) - U(S)\bigr)

and by permutations (Castro, Gomez, Tejada 2009): ``phi_i`` is the mean over
uniformly random orders ``pi`` of ``U(players before i, and i) -
U(players before i)``; antithetic pairs ``(pi, reversed pi)`` reduce the
variance.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

#: Largest batch enumerated exactly (``2^n`` coalitions) where a method
#: chooses between enumeration and permutation sampling: the
#: ``"coalitions"`` metric and the fidelity report's ground truth.
EXACT_MAX_PLAYERS = 12


def subset_masks(num_players: int) -> np.ndarray:
  """All coalitions, ``int64[2^n, n]``: bit ``i`` of row ``S`` = player ``i``
  is in ``S``."""
  n = num_players
  return (np.arange(2 ** n, dtype=np.int64)[:, None] >> np.arange(n)) & 1


def _xp(x):
  """NumPy for NumPy inputs (the float64 ground truth), else ``jax.numpy``."""
  return np if isinstance(x, np.ndarray) else jnp


@functools.lru_cache(maxsize=None)
def _marginal_pairs(n: int):
  """Row indices ``(without, with)`` int64[n, 2^(n-1)] of the coalitions
  ``S`` without player ``i`` and ``S + i``, and the Shapley weights
  ``w(|S|) = |S|! (n - |S| - 1)! / n!`` f64[n, 2^(n-1)]."""
  masks = subset_masks(n)
  fact = np.array([math.factorial(k) for k in range(n + 1)], np.float64)
  without = np.stack([np.flatnonzero(masks[:, i] == 0) for i in range(n)])
  size = masks.sum(1)[without]
  return without, without | (1 << np.arange(n))[:, None], (
      fact[size] * fact[n - size - 1] / fact[n])


def exact_values(u):
  """Shapley values ``f[n]`` from ``U`` on every coalition, ``f[2^n]`` in the
  row order of :func:`subset_masks`.

  Summed as weighted marginal contributions ``U(S + i) - U(S)`` (not as
  ``W^T U``, whose terms cancel only up to rounding), so a null player gets
  exactly 0.  NumPy in, NumPy out; a JAX array (also traced) gives a JAX
  array.
  """
  n = int(u.shape[0]).bit_length() - 1
  without, with_, w = _marginal_pairs(n)
  xp = _xp(u)
  return xp.sum(xp.asarray(w, u.dtype) * (u[with_] - u[without]), axis=1)


def permutations(key: jax.Array, num_permutations: int, num_players: int,
                 antithetic: bool = True) -> jax.Array:
  """``int32[P, n]`` random orders of the players; with ``antithetic`` rows
  ``2k`` and ``2k + 1`` are a permutation and its reverse (``P`` even).
  Traceable: the same draws eagerly and inside ``jit``."""
  draws = num_permutations // 2 if antithetic else num_permutations
  perms = jax.vmap(lambda k: jax.random.permutation(k, num_players))(
      jax.random.split(key, draws))
  if antithetic:
    perms = jnp.stack([perms, perms[:, ::-1]], axis=1).reshape(
        num_permutations, num_players)
  return perms


def prefix_masks(ranks) -> jax.Array:
  """``f32[P, n - 1, n]``: coalition ``k - 1`` of row ``q`` holds the first
  ``k`` players (``k = 1 .. n - 1``) of permutation ``q``, given its ranks
  ``ranks[q, j]`` = position of player ``j`` (``argsort`` of the
  permutation).  ``U(empty)`` and ``U(all)`` are left to the caller."""
  xp = _xp(ranks)
  k = xp.arange(1, ranks.shape[-1])
  return (ranks[:, None, :] < k[None, :, None]).astype(xp.float32)


def permutation_marginals(ranks, u_prefix, u_empty, u_full) -> jax.Array:
  """Each player's marginal contribution in each permutation, ``[P, n]``.

  Args:
    ranks: ``[P, n]``, position of player ``j`` in permutation ``q``.
    u_prefix: ``[P, n - 1]``, ``U`` on :func:`prefix_masks`.
    u_empty, u_full: ``U(empty)`` and ``U(all players)``.

  Every row sums to ``u_full - u_empty`` (efficiency of each permutation).
  NumPy in, NumPy out (float64 stays float64 outside JAX's 64-bit mode).
  """
  xp, p = _xp(u_prefix), ranks.shape[0]
  chain = xp.concatenate([xp.full((p, 1), u_empty, u_prefix.dtype), u_prefix,
                          xp.full((p, 1), u_full, u_prefix.dtype)], axis=1)
  return (xp.take_along_axis(chain, ranks + 1, axis=1)
          - xp.take_along_axis(chain, ranks, axis=1))
