r"""Per-layer rules: which Flax module calls have an exact ghost contraction.

For a module whose output is *linear in its parameters* (``y = f(x; theta)``
with ``f(x; a + b) = f(x; a) + f(x; b)``), the per-example gradient of example
``i`` contracted with a direction ``d`` is (the exact rule of the "Models and layers" guide)

.. math::

    x_i \cdot d_\theta = \sum_s \langle f(x_{is}; d_\theta), b_{is} \rangle

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
import numpy as np

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
  """The error for an ``nn.Dropout`` at ``path`` that draws one mask for
  the whole batch."""
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


# ---------------------------------------------------------------------------
# Rules chosen per call: per-example gradients (first convolutions), ghost.


def prefers_per_example(module: nn.Module, method_name: str,
                        in_shapes: tuple, out_shape: tuple, batch: int,
                        param_size: int) -> bool:
  """Whether a call's per-example parameter gradients (``B`` times its
  parameters) take less memory than its factors (its array inputs and its
  output cotangent): small kernels applied at many positions, such as a
  first convolution.  This is the per-layer choice between ghost
  factors and per-sample gradients of differentially private training
  (Bu et al. 2022, "Scalable and efficient training of large convolutional
  neural networks with differential privacy").

  Only calls :func:`has_tap_rule` accepts qualify: their per-example kernel
  gradients come from strided slices of the input
  (:func:`conv_per_example_grads`), whereas the generic per-example vjp
  becomes a batch-grouped convolution that XLA transposes through
  cotangent-sized buffers, which loses what it saves.

  Args:
    module, method_name: the call.
    in_shapes: shapes of its array inputs; out_shape: of its output.
    batch: ``B``; param_size: number of entries of its parameters.
  """
  if not has_tap_rule(module, method_name, in_shapes):
    return False
  factors = sum(int(np.prod(s)) for s in in_shapes) + int(np.prod(out_shape))
  return batch * param_size < factors


def has_tap_rule(module: nn.Module, method_name: str,
                 in_shapes: tuple) -> bool:
  """Whether :func:`conv_per_example_grads` gives the call's per-example
  gradients: an ``nn.Conv.__call__`` on one array input, without feature
  groups, a kernel mask, input dilation or a custom
  ``conv_general_dilated`` / ``promote_dtype``, padded ``"SAME"``,
  ``"VALID"`` or explicitly (:func:`conv_geometry`)."""
  m = module
  return not (
      type(m) is not nn.Conv or method_name != "__call__"
      or m.feature_group_count != 1 or m.mask is not None
      # A user-supplied convolution or dtype promotion computes something
      # the tap rule does not know.
      or getattr(m, "conv_general_dilated", None) is not None
      or getattr(m, "conv_general_dilated_cls", None) is not None
      or getattr(m, "promote_dtype", nn.dtypes.promote_dtype)
      is not nn.dtypes.promote_dtype
      or len(in_shapes) != 1
      or conv_geometry(m, in_shapes[0]) is None)


def has_ghost_rule(module: nn.Module, method_name: str) -> bool:
  """Whether the call is ``y = a W + c`` exactly as the ghost rule
  (:mod:`optax_shapley.ghost`) assumes: an ``nn.Dense.__call__`` with
  flax's own ``lax.dot_general`` and dtype promotion.  A custom
  ``dot_general`` (quantised or sparse products) or ``promote_dtype`` keeps
  the exact rule, which re-applies the module itself."""
  return (type(module) is nn.Dense and method_name == "__call__"
          and getattr(module, "dot_general", None) is None
          and getattr(module, "dot_general_cls", None) is None
          and getattr(module, "promote_dtype", nn.dtypes.promote_dtype)
          is nn.dtypes.promote_dtype)


def conv_geometry(module: nn.Conv, in_shape: tuple):
  """``(kernel_size, strides, kernel_dilation, pads)`` of an ``nn.Conv``
  applied to ``f[B, *spatial, C_in]``, or ``None`` where the per-example
  rule does not cover it (input dilation, circular/reflect/causal padding,
  extra batch axes)."""
  k = module.kernel_size
  ks = (k,) if isinstance(k, int) else tuple(k)
  n = len(ks)
  if len(in_shape) != n + 2:
    return None
  as_tuple = lambda v: (1,) * n if v is None else (
      (v,) * n if isinstance(v, int) else tuple(v))
  strides, dil = as_tuple(module.strides), as_tuple(module.kernel_dilation)
  if any(d != 1 for d in as_tuple(module.input_dilation)):
    return None
  padding = nn.linear.canonicalize_padding(module.padding, n)
  if padding in ("SAME", "VALID"):
    window = tuple((k - 1) * d + 1 for k, d in zip(ks, dil))
    pads = tuple(jax.lax.padtype_to_pads(in_shape[1:-1], window, strides,
                                         padding))
  elif isinstance(padding, str):
    return None
  else:
    pads = tuple(tuple(p) for p in padding)
  return ks, strides, dil, pads


def conv_per_example_grads(module: nn.Conv, x: jax.Array,
                            cot: jax.Array) -> dict:
  """Per-example gradients of an ``nn.Conv`` call, one kernel tap at a time.

  With ``x`` padded as the convolution pads it and ``x_i[s + o]`` the input
  seen by kernel tap ``o`` at output position ``s`` (strides and kernel
  dilation applied), summing over output positions ``s``::

    dl_i/dW[o, :, c] = sum_s x_i[s + o, :] * b_is[c]
    dl_i/db[c]       = sum_s b_is[c]

  One strided slice of the padded input and one batched product per tap
  (im2col without forming all patches at once: on XLA's CPU backend a
  one-hot "patch" convolution with one input channel costs more than the
  whole weight gradient).  Computed in at least float32 at the highest
  matmul precision, whatever the module's ``dtype`` and ``precision``: with
  a bf16 module the batch gradient of this layer is then closer to a
  float32 computation than ``jax.grad``'s (measured 1.5e-3 against 2.6e-3
  of the largest entry).

  Args:
    module: unbound ``nn.Conv``, ``feature_group_count == 1``, no mask,
      geometry covered by :func:`conv_geometry`.
    x: ``f[B, *spatial, C_in]``, the call's input.
    cot: ``f[B, *spatial_out, C_out]``: the output cotangent ``b``.

  Returns:
    ``{("kernel",): [B, *kernel_size, C_in, C_out], ("bias",): [B, C_out]}``
    in float32 (float64 for float64 inputs); no bias entry when ``use_bias``
    is false.
  """
  # Tie the input to the cotangent: otherwise XLA slices the taps in the
  # forward pass (they depend on x only) and keeps them to the end.
  x, cot = jax.lax.optimization_barrier((x, cot))
  ks, strides, dil, pads = conv_geometry(module, x.shape)
  dtype = jnp.result_type(x.dtype, cot.dtype, jnp.float32)
  # lax.pad: explicit pads may be negative (cropping), as in lax.conv.
  xp = jax.lax.pad(x.astype(dtype), jnp.zeros((), dtype),
                   ((0, 0, 0),) + tuple((lo, hi, 0) for lo, hi in pads)
                   + ((0, 0, 0),))
  b = cot.astype(dtype)
  out_sp = b.shape[1:-1]
  taps = []
  for offset in np.ndindex(*ks):
    window = xp[(slice(None),) + tuple(
        slice(o * d, o * d + (n - 1) * st + 1, st)
        for o, d, n, st in zip(offset, dil, out_sp, strides))]
    taps.append(jnp.einsum("b...i,b...c->bic", window, b,
                           precision=jax.lax.Precision.HIGHEST))
  batch, c_in, c_out = b.shape[0], x.shape[-1], b.shape[-1]
  kernel = jnp.stack(taps, 1).reshape((batch,) + ks + (c_in, c_out))
  out = {("kernel",): kernel}
  if module.use_bias:
    out[("bias",)] = b.sum(tuple(range(1, b.ndim - 1)))
  return out
