"""The real one-step utility of a training step, in float64.

For a training step with parameters ``w``, optimizer state ``s`` (held
fixed) and per-example gradients of a batch of ``B`` examples,
:func:`step_utility` returns ``U(S) = L(w) - L(w + u(g_S))`` on coalition
masks, by re-running the optimizer update; :mod:`optax_shapley.truth`
computes Shapley values and leave-one-out of it.  See that module for the
precision rules (float64 by default).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["Utility", "enable_x64", "precision", "per_example_grads",
           "step_utility"]

#: A utility of coalitions, ``mask f[..., B] -> f[...]``.
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
def precision(dtype) -> Iterator[None]:
  """64-bit mode inside the block when ``dtype`` is a 64-bit type."""
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

  with precision(dtype):
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

  with precision(dtype):
    p = _cast_floats(params, dtype)
    grads = _cast_floats(per_example_grads, dtype)
    state = _cast_floats(opt_state, dtype)
    base_loss = mean_loss(p)

  def utility(mask):
    with precision(dtype):
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
