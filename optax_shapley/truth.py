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

import contextlib
import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_shapley import shapley

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

Utility = Callable[[jax.Array], jax.Array]


# ---------------------------------------------------------------------------
# 64-bit mode


@contextlib.contextmanager
def enable_x64() -> Iterator[None]:
  """Context manager that turns on JAX's 64-bit mode inside its block.

  ``jax.enable_x64(True)`` (thread-local; it is part of the ``jit`` cache
  key, so functions traced inside and outside differ); a no-op when 64-bit
  mode is on already.

  Arrays created inside keep their 64-bit dtype after the block ends, but
  operations on them outside the block are computed in 32 bits again; that
  is why the utilities returned by :func:`step_utility` re-enter the block on
  every call.

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_shapley import truth
    >>> with truth.enable_x64():
    ...   print(jnp.ones(2).dtype)
    float64
  """
  if bool(jax.config.jax_enable_x64):
    yield
    return
  with jax.enable_x64(True):
    yield


def _wants_x64(dtype) -> bool:
  return dtype is not None and jnp.dtype(dtype).itemsize == 8


@contextlib.contextmanager
def _precision(dtype) -> Iterator[None]:
  if _wants_x64(dtype):
    with enable_x64():
      yield
  else:
    yield


def _check_dtype(dtype):
  if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
    raise ValueError(f"dtype must be a floating dtype or None, got {dtype!r}.")


def _cast_floats(tree, dtype):
  """Casts the floating array leaves of ``tree`` to ``dtype``; others kept."""
  if dtype is None:
    return tree

  def cast(x):
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
      return jnp.asarray(x, dtype)
    return x

  return jax.tree.map(cast, tree)


# ---------------------------------------------------------------------------
# Per-example gradients


def per_example_grads(
    per_example_loss: Callable[..., jax.Array],
    params: Any,
    *args: Any,
    dtype: Any = jnp.float64,
) -> Any:
  """Reference per-example gradients ``grad l_i(w)``, one example at a time.

  Computed as ``jax.vmap(jax.grad(...))`` over examples, where each call of
  ``per_example_loss`` sees a batch of *one* example (the leading axis is put
  back with ``x[None]``) and element 0 of its output is differentiated. This
  is independent of any per-layer trick in the rest of the library.

  Args:
    per_example_loss: ``per_example_loss(params, *args) -> f[B]``, the losses
      of a batch.
    params: parameter pytree ``w``.
    *args: the batch. Every array leaf with ``ndim >= 1`` has the leading
      axis ``B`` and is mapped over; other leaves (Python scalars, 0-d
      arrays) are passed unchanged to every call. Integer leaves (labels,
      tokens) are never cast.
    dtype: floating dtype the floating leaves of ``params`` are cast to
      (64-bit mode is enabled locally for float64). ``None``: no cast.

  Returns:
    The gradients, a pytree like ``params`` with a leading axis ``B`` on
    every leaf: ``grads[leaf][i] = d l_i / d leaf``. *Not* scaled by ``1/B``.

  Raises:
    ValueError: no batched array leaf in ``args``, or leading axes differ.

  Example:
    A linear model with squared error, ``l_i = (x_i . w - y_i)^2 / 2``, whose
    gradients are ``(x_i . w - y_i) x_i``:

    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from optax_shapley import truth
    >>> loss = lambda p, x, y: 0.5 * (x @ p["w"] - y) ** 2       # f[B]
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> y = jnp.array([0.0, 1.0, 2.0])
    >>> g = truth.per_example_grads(loss, params, x, y)      # residuals 1, 1, 1
    >>> print(np.asarray(g["w"]))
    [[1. 0.]
     [0. 1.]
     [1. 1.]]
    >>> print(g["w"].dtype)
    float64
  """
  _check_dtype(dtype)
  leaves, treedef = jax.tree.flatten(args)
  batched = [
      i for i, x in enumerate(leaves) if hasattr(x, "shape") and np.ndim(x) >= 1
  ]
  if not batched:
    raise ValueError("per_example_grads needs at least one batched array in args.")
  sizes = {int(np.shape(leaves[i])[0]) for i in batched}
  if len(sizes) != 1:
    raise ValueError(f"Batched args disagree on the batch size: {sorted(sizes)}.")

  with _precision(dtype):
    p = _cast_floats(params, dtype)
    try:      # one compiled program per loss and batch structure
      hash(per_example_loss)
      grad_fn = _per_example_grad_fn(per_example_loss, treedef, tuple(batched))
    except TypeError:
      grad_fn = _per_example_grad_fn.__wrapped__(per_example_loss, treedef,
                                                  tuple(batched))
    return grad_fn(p, leaves)


@functools.lru_cache(maxsize=64)
def _per_example_grad_fn(per_example_loss, treedef, batched):
  """Jitted ``vmap(grad)`` of one example's loss; ``batched``: positions of
  the leaves of the flattened args that carry the batch axis."""
  def one_loss(p, all_leaves):
    full = [x[None] if i in batched else x for i, x in enumerate(all_leaves)]
    out = per_example_loss(p, *jax.tree.unflatten(treedef, full))
    return jnp.reshape(out, (-1,))[0]

  def grads(p, all_leaves):
    axes = [0 if i in batched else None for i in range(len(all_leaves))]
    return jax.vmap(jax.grad(one_loss), in_axes=(None, axes))(p, all_leaves)

  return jax.jit(grads)


# ---------------------------------------------------------------------------
# The utility of the real step


def step_utility(
    tx: optax.GradientTransformation,
    opt_state: optax.OptState,
    params: optax.Params,
    per_example_grads: Any,
    val_loss: Callable[[Any], jax.Array],
    *,
    reduction: str = "mean",
    dtype: Any = jnp.float64,
) -> Utility:
  """The one-step utility ``U(S)`` of the true optimizer step.

  ``U(S) = L(w) - L(w + u(g_S))`` with ``g_S = c * sum_i mask_i grad l_i(w)``,
  ``c = 1/B`` for ``reduction="mean"`` and ``1`` for ``"sum"`` (``B`` the
  full batch size, also for smaller coalitions), ``u(g) = tx.update(g,
  opt_state, params)[0]`` with the state held fixed, ``w + u`` by
  :func:`optax.apply_updates` and ``L(w) = mean(val_loss(w))``. Positive
  ``U``: the validation loss went down. ``U(empty)`` is the effect of the
  gradient-free step ``u(0)`` (Adam's momentum), which belongs to no player.

  Args:
    tx: any optax transformation; only ``tx.update(g, state, params)`` is
      called (no extra arguments).
    opt_state: the optimizer state *before* this step, ``s_{t-1}``.
    params: the parameters ``w_t`` at which the gradients were taken.
    per_example_grads: pytree like ``params`` with a leading axis ``B`` on
      every leaf (see :func:`per_example_grads`), unscaled.
    val_loss: ``val_loss(params) -> f[V]``, per-example validation losses.
      It may close over float32 data; integer data are left as they are.
    reduction: ``"mean"`` or ``"sum"``, how the training step reduces the
      per-example gradients.
    dtype: floating dtype of the whole computation (params, gradients,
      optimizer state, the model in ``val_loss``); float64 enables 64-bit
      mode locally, at construction and on every call. ``None``: as given.

  Returns:
    ``utility(mask) -> f[...]``: ``mask`` is ``f[..., B]`` of 0/1 membership
    (fractional values give the utility of the scaled gradient); leading axes
    are mapped with ``jax.vmap``. The result has ``dtype`` (or the natural
    dtype for ``None``); outside 64-bit mode, convert it with ``float`` or
    ``np.asarray`` before further arithmetic, as JAX ops there would round it
    to float32. ``utility`` can be traced (``vmap``, ``lax.map``,
    ``jit``); under an outer trace, enable 64-bit mode there too (the
    functions of this module do).

  Raises:
    ValueError: unknown ``reduction``, gradients without a common leading
      axis, or (on call) a mask whose last axis is not ``B``.

  Example:
    One SGD step on a linear model; the validation loss is the squared
    output, 2.0 at ``w``:

    >>> import jax.numpy as jnp
    >>> import optax
    >>> from optax_shapley import truth
    >>> loss = lambda p, x: 0.5 * (x @ p["w"]) ** 2
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> val_loss = lambda p: (x @ p["w"]) ** 2               # f[V]
    >>> tx = optax.sgd(0.1)
    >>> grads = truth.per_example_grads(loss, params, x)
    >>> u = truth.step_utility(tx, tx.init(params), params, grads, val_loss)
    >>> round(float(u(jnp.ones(3))), 4)   # the whole batch lowers the loss
    0.1933
    >>> round(float(u(jnp.zeros(3))), 9)  # plain SGD: no gradient, no step
    0.0
    >>> u(jnp.eye(3)).shape               # a mask per row: one coalition each
    (3,)
  """
  if reduction not in ("mean", "sum"):
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
  _check_dtype(dtype)
  grad_leaves = jax.tree.leaves(per_example_grads)
  if not grad_leaves:
    raise ValueError("per_example_grads has no leaves.")
  sizes = {int(np.shape(g)[0]) if np.ndim(g) else -1 for g in grad_leaves}
  if len(sizes) != 1 or -1 in sizes:
    raise ValueError(
        "Every leaf of per_example_grads needs the same leading batch axis; "
        f"got leading sizes {sorted(sizes)}."
    )
  (num_players,) = sizes
  scale = 1.0 / num_players if reduction == "mean" else 1.0

  try:      # one compiled program per (tx, val_loss): later steps reuse it
    hash((tx, val_loss))
    compiled = functools.partial(_utility_batch, tx=tx, val_loss=val_loss,
                                 scale=scale)
    mean_loss = functools.partial(_mean_val_loss, val_loss=val_loss)
  except TypeError:
    compiled = jax.jit(functools.partial(_utility_batch.__wrapped__, tx=tx,
                                         val_loss=val_loss, scale=scale))
    mean_loss = jax.jit(lambda p: jnp.mean(val_loss(p)))

  with _precision(dtype):
    p = _cast_floats(params, dtype)
    grads = _cast_floats(per_example_grads, dtype)
    state = _cast_floats(opt_state, dtype)
    base_loss = mean_loss(p)

  def utility(mask):
    with _precision(dtype):
      mask = jnp.asarray(mask)
      if mask.ndim == 0 or mask.shape[-1] != num_players:
        raise ValueError(
            f"mask must have shape [..., {num_players}], got {mask.shape}."
        )
      if not jnp.issubdtype(mask.dtype, jnp.floating) and dtype is not None:
        mask = mask.astype(dtype)
      return compiled(mask, p, grads, state, base_loss)

  utility.num_players = num_players  # type: ignore[attr-defined]
  # utility accepts f[..., B] masks in one compiled call (see _evaluate).
  utility.vectorized = True  # type: ignore[attr-defined]
  return utility


@functools.partial(jax.jit, static_argnames=("val_loss",))
def _mean_val_loss(p, *, val_loss):
  return jnp.mean(val_loss(p))


@functools.partial(jax.jit, static_argnames=("tx", "val_loss", "scale"))
def _utility_batch(mask, p, grads, state, base_loss, *, tx, val_loss, scale):
  """``U`` on every row of ``mask`` f[..., B] (see :func:`step_utility`)."""
  def single(m):
    m = m.astype(jax.tree.leaves(grads)[0].dtype)
    g = jax.tree.map(lambda x: scale * jnp.tensordot(m, x, axes=1), grads)
    updates, _ = tx.update(g, state, p)
    return base_loss - jnp.mean(val_loss(optax.apply_updates(p, updates)))

  lead = mask.shape[:-1]
  flat = jnp.reshape(mask, (-1, mask.shape[-1]))
  return jnp.reshape(jax.vmap(single)(flat), lead)


# ---------------------------------------------------------------------------
# Shapley values of a utility


def _evaluate(utility: Utility, masks: np.ndarray, chunk_size: int, dtype) -> np.ndarray:
  """``utility`` on each row of ``masks`` [M, n], vmapped in chunks; f64 numpy."""
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
  with _precision(dtype):
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
