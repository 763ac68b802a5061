"""Per-layer rules: which Flax module calls have an exact ghost contraction.

For a module whose output is *linear in its parameters* (``y = f(x; theta)``
with ``f(x; a + b) = f(x; a) + f(x; b)``), the per-example gradient of example
``i`` contracted with a direction ``d`` is (docs/index.md, "Capture and contraction")::

    x_i . d_theta = sum_s  <f(x_is; d_theta), b_is>

where ``x_is`` is the module's input for example ``i`` (position ``s``) and
``b_is = c * dl_i / dy_is`` the cotangent of its output (``c = 1/B`` for a mean
reduction).  Evaluating the module with ``d`` in place of its parameters is one
forward pass of that layer; no per-example gradient is formed.  For
``nn.Dense`` this is ``sum_s (a_is d_W + d_c) . b_is``; for ``nn.Embed`` it is
the gather ``sum_s d_E[tok_is] . b_is``; for ``nn.LayerNorm`` it is
``sum_s (xhat_is * d_scale + d_bias) . b_is``.

Modules not listed here are never guessed at: their parameters go through the
exact forward-mode fallback in :mod:`optax_shapley.capture`.  Modules that mix
examples of the batch are refused with :class:`UnsupportedModuleError`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Module type -> methods whose output is linear in the module's parameters.
# Exact types only: a subclass may override ``__call__`` with something else.
LINEAR_IN_PARAMS: dict[type, tuple[str, ...]] = {
    nn.Dense: ("__call__",),
    nn.DenseGeneral: ("__call__",),
    nn.Einsum: ("__call__",),
    nn.Embed: ("__call__", "attend"),
    nn.LayerNorm: ("__call__",),
    nn.RMSNorm: ("__call__",),
    nn.Conv: ("__call__",),
    nn.ConvTranspose: ("__call__",),
    nn.ConvLocal: ("__call__",),
    nn.GroupNorm: ("__call__",),
}


def is_affine_only(module: nn.Module) -> bool:
  """A norm without ``scale`` computes ``xhat + bias``: affine, not linear, in
  its parameters, so its rule subtracts the parameter-free part ``xhat``."""
  return (isinstance(module, (nn.LayerNorm, nn.GroupNorm))
          and not module.use_scale)


class UnsupportedModuleError(ValueError):
  """A module in the per-example loss mixes the examples of a batch."""


def is_supported(module: nn.Module, method_name: str) -> bool:
  """Whether ``module.method_name`` has an exact linear-in-parameters rule."""
  return method_name in LINEAR_IN_PARAMS.get(type(module), ())


def check_no_batch_mixing(module: nn.Module, method_name: str, kwargs) -> None:
  """Raises :class:`UnsupportedModuleError` for calls that mix examples.

  A per-example value needs ``l_i`` to depend on example ``i`` alone.
  ``nn.BatchNorm`` in training mode normalises with statistics of the whole
  batch, so the gradient of ``l_i`` involves every example.
  """
  if isinstance(module, nn.BatchNorm) and method_name == "__call__":
    use_running = kwargs.get("use_running_average", None)
    use_running = nn.merge_param(
        "use_running_average", module.use_running_average, use_running
    ) if (module.use_running_average is not None or use_running is not None) else None
    if not use_running:
      raise UnsupportedModuleError(
          f"nn.BatchNorm at {'/'.join(module.path) or '<root>'} is in training "
          "mode (use_running_average=False): it normalises with statistics of "
          "the whole batch, so example i's loss depends on the other examples "
          "and per-example values are undefined. Use use_running_average=True "
          "(or LayerNorm/GroupNorm) in the per-example loss."
      )


def draws_batch_mask(module: nn.Module, method_name: str, args, kwargs) -> bool:
  """Whether this is an ``nn.Dropout`` call that draws a random mask.

  Such a call is only per-example if each example gets its own key (the
  per-example loss maps a one-example function over the batch with
  ``jax.vmap``); one mask drawn for the whole batch ties example ``i``'s loss
  to its position and to the other examples.  The capture decides which by
  the call's input (see :func:`dropout_error`).
  """
  if not (isinstance(module, nn.Dropout) and method_name == "__call__"):
    return False
  if module.rate == 0.0:
    return False
  mod_det = module.deterministic
  call_det = kwargs.get("deterministic", args[1] if len(args) > 1 else None)
  if (mod_det is None) == (call_det is None):
    return False        # neither or both given: flax itself raises
  return not (mod_det if call_det is None else call_det)


def dropout_error(path: str) -> UnsupportedModuleError:
  return UnsupportedModuleError(
      f"nn.Dropout at {path or '<root>'} draws one random mask for the whole "
      "batch (deterministic=False, one RNG): example i's loss then depends on "
      "its position in the batch and per-example values are not defined. Use "
      "deterministic=True, or give every example its own key: write the loss "
      "for one example and jax.vmap it over (example, key) pairs.")


def apply_with_params(module: nn.Module, method_name: str, params: Any,
                      args: tuple, kwargs: dict) -> jax.Array:
  """Calls ``module.method_name(*args, **kwargs)`` with ``params`` as weights.

  ``module`` is an unbound clone; ``params`` its ``'params'`` collection.
  """
  method = None if method_name == "__call__" else method_name
  return module.apply({"params": params}, *args, method=method, **kwargs)


def contract(module: nn.Module, method_name: str, direction: Any,
             args: tuple, kwargs: dict, cotangent: jax.Array) -> jax.Array:
  """Exact ``x_i . d`` for one linear-in-parameters module call.

  Args:
    module: unbound clone of the module that was called.
    method_name: the method that was called (``"__call__"``, ``"attend"``).
    direction: the module's slice of the direction ``d``, same tree as its
      ``'params'`` collection.
    args, kwargs: the call's inputs, leading axis ``B``.
    cotangent: ``b``, f[B, ...], the output cotangent already scaled by the
      reduction (``1/B`` for a mean).

  Returns:
    f32[B]: ``sum_s <f(x_is; d), b_is>``, accumulated in float32.
  """
  t = apply_with_params(module, method_name, direction, args, kwargs)
  if is_affine_only(module):
    zero = jax.tree.map(jnp.zeros_like, direction)
    t = t - apply_with_params(module, method_name, zero, args, kwargs)
  batch = cotangent.shape[0]
  prod = t.astype(jnp.float32) * cotangent.astype(jnp.float32)
  return jnp.sum(prod.reshape(batch, -1), axis=1)
