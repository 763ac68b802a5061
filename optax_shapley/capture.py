"""Capture of ghost factors: per-example losses, the batch gradient, and factors.

``value_grad_and_factors(per_example_loss)(params, *args)`` runs one forward
and one backward pass of ``per_example_loss`` with Flax interceptors
(``flax.linen.intercept_methods``) installed inside the traced function
(the "Models and layers" guide).  For every call of a supported module
(see :mod:`optax_shapley.layers`) it keeps the call's inputs and adds a zero
*probe* to the call's output; the probe's cotangent from ``jax.vjp`` is the
output gradient ``b_i`` of every example.  Inputs leave the trace as auxiliary
outputs of the vjp'd function.

Parameters not owned by a supported call (a raw ``self.param``, a custom
layer, a module inside a lifted transform such as ``nn.scan``) are contracted
exactly by forward-mode ``jax.jvp`` of the per-example losses along the
direction restricted to those leaves.  A use of an owned parameter that the
interceptors cannot see (an L2 penalty on a Dense kernel inside the loss) is
caught by the transformation's add-up check, ``sum_i x_i . d = g . d``.
"""

from __future__ import annotations

import collections
import dataclasses
import warnings
from typing import Any, Callable

import flax.linen as nn
import jax
from jax.extend import core as jex_core
import jax.numpy as jnp
import numpy as np

from optax_shapley import layers, vma
from optax_shapley.factors import (REDUCTIONS, CallPlan, Factors, param_paths,
                                   reduction_scale, set_path)


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic)) or isinstance(
      x, jax.core.Tracer)


def _call_key(counter: collections.Counter, module: nn.Module, method: str):
  """``(module path, method, call index)``: the same in every trace of a loss."""
  path = tuple(module.path)
  key = (path, method, counter[(path, method)])
  counter[(path, method)] += 1
  return key


def _flatten_call_args(args, kwargs):
  leaves, treedef = jax.tree.flatten((args, kwargs))
  arrays = tuple(x for x in leaves if _is_array(x))
  statics = tuple((i, x) for i, x in enumerate(leaves) if not _is_array(x))
  return arrays, treedef, statics, len(leaves)


@dataclasses.dataclass(frozen=True)
class _CallRecord:
  """A call of a module with a layer rule, seen while tracing abstractly.

  ``owned`` pairs each of the module's parameter name paths with its leaf
  index in ``params`` (``None`` where the module holds an array that is not
  a leaf of ``params``); ``top_level`` says the call ran in the loss's own
  trace, not inside a ``jax.lax.scan``, ``jax.vmap`` or lifted transform,
  whose inputs cannot leave as auxiliary outputs.
  """
  key: tuple
  module: nn.Module
  method: str
  owned: tuple
  out: jax.ShapeDtypeStruct | None
  out_axes: tuple
  in_shapes: tuple
  args_treedef: Any
  static_leaves: tuple
  num_leaves: int
  top_level: bool

  def carries_batch(self, batch: int) -> bool:
    """Whether the inputs and the output have ``batch`` leading rows."""
    return ((self.out is None or self.out.shape[:1] == (batch,))
            and all(s[:1] == (batch,) for s in self.in_shapes))


@dataclasses.dataclass(frozen=True)
class _MaskDraw:
  """An ``nn.Dropout`` call that draws a random mask (``in_shape``: its
  input's shape)."""
  key: tuple
  path: str
  in_shape: tuple


def _discover(per_example_loss, params, args):
  """Traces the loss abstractly; returns ``(loss shape, [_CallRecord],
  [_MaskDraw])``."""
  calls, draws = [], []

  arg_leaves, arg_def = jax.tree.flatten(args)
  dynamic = [i for i, x in enumerate(arg_leaves)
             if _is_array(x) or isinstance(x, jax.ShapeDtypeStruct)]

  def fn(p, arrays):
    full = list(arg_leaves)
    for i, x in zip(dynamic, arrays):
      full[i] = x
    a = jax.tree.unflatten(arg_def, full)
    leaves = jax.tree.leaves(p)
    index = {id(x): i for i, x in enumerate(leaves)}
    counter = collections.Counter()
    top = jex_core.get_opaque_trace_state()

    def interceptor(next_fun, call_args, call_kwargs, context):
      module, method = context.module, context.method_name
      layers.check_no_batch_mixing(module, method, call_kwargs)
      if layers.draws_batch_mask(module, method, call_args, call_kwargs):
        draws.append(_MaskDraw(_call_key(counter, module, method),
                               "/".join(module.path), jnp.shape(call_args[0])))
        return next_fun(*call_args, **call_kwargs)
      if not layers.is_supported(module, method):
        return next_fun(*call_args, **call_kwargs)
      key = _call_key(counter, module, method)
      owned = tuple((name, index.get(id(x)))
                    for name, x in param_paths(module.variables.get("params", {})))
      out = next_fun(*call_args, **call_kwargs)
      arrays, treedef, statics, n = _flatten_call_args(call_args, call_kwargs)
      has_shape = hasattr(out, "shape")
      calls.append(_CallRecord(
          key=key, module=module.clone(parent=None, name=module.name),
          method=method, owned=owned,
          out=jax.ShapeDtypeStruct(out.shape, out.dtype) if has_shape else None,
          out_axes=vma.varying_axes(out) if has_shape else (),
          in_shapes=tuple(x.shape for x in arrays), args_treedef=treedef,
          static_leaves=statics, num_leaves=n,
          top_level=jex_core.get_opaque_trace_state() == top))
      return out

    with nn.intercept_methods(interceptor):
      return per_example_loss(p, *a)

  loss_shape = jax.eval_shape(fn, params, [arg_leaves[i] for i in dynamic])
  return loss_shape, calls, draws


def _batched_keys(per_example_loss, params, args, batch):
  """Keys of the calls whose inputs and output really carry the batch axis.

  A shape test alone mistakes data without a batch axis for per-example data
  when its length happens to equal ``B`` (positions ``arange(T)`` with
  ``T == B``).  So the loss is traced again, abstractly, with every batched
  argument one example longer; a per-example call's leading axes follow.
  Returns ``(keys, why)``: ``keys`` is empty (every leaf then goes to the
  exact fallback) when no argument is batched or the loss cannot be traced
  at another size; ``why`` says, for a warning, why no key would be found.
  """
  def grow(x):
    if _is_array(x) and getattr(x, "ndim", 0) and x.shape[0] == batch:
      return jax.ShapeDtypeStruct((batch + 1,) + tuple(x.shape[1:]), x.dtype)
    return x
  if not any(_is_array(x) and getattr(x, "ndim", 0) and x.shape[0] == batch
             for x in jax.tree.leaves(args)):
    # Data closed over: nothing proves a call per-example.
    return set(), (f"no argument has the batch ({batch}) on its leading "
                   "axis: the loss closes over its data. Pass the batch as "
                   "arguments: value_grad_and_factors(loss)(params, x, y)")
  try:
    _, calls, draws = _discover(per_example_loss, params,
                                jax.tree.map(grow, args))
  except Exception:  # pylint: disable=broad-except
    # Cannot tell: no call is probed, all leaves fall back.
    return set(), (f"the loss could not be traced with a batch of "
                   f"{batch + 1} (does it fix the batch size?)")
  keys = {r.key for r in calls if r.carries_batch(batch + 1)}
  keys |= {d.key for d in draws if d.in_shape[:1] == (batch + 1,)}
  return keys, ("no module call's input and output carry the batch on "
                "their leading axis (module calls inside a jax.vmap over "
                "examples, nn.scan or nn.remat are not probed)")


def _check_dropout(draws, batch, batched_keys):
  """Raises for a dropout mask drawn across the batch (see layers)."""
  for d in draws:
    batched = (d.key in batched_keys if batched_keys is not None
               else d.in_shape[:1] == (batch,))
    if batched:
      raise layers.dropout_error(d.path)


def _plan(calls, batch, num_leaves, leaf_is_float, batched_keys=None,
          leaf_sizes=None):
  """Chooses which calls get probes; the rest of the leaves fall back.
  With ``leaf_sizes`` (parameter leaf sizes), calls whose per-example
  gradients are smaller than their factors are planned ``per_example``."""
  valid, tainted = [], set()
  for r in calls:
    matched = [i for _, i in r.owned if i is not None]
    ok = (r.top_level and bool(r.owned) and len(matched) == len(r.owned)
          and r.out is not None and r.carries_batch(batch)
          and jnp.issubdtype(r.out.dtype, jnp.inexact)
          and (batched_keys is None or r.key in batched_keys))
    if ok:
      valid.append(r)
    else:
      tainted.update(matched)
  plans, ruled = [], set()
  for r in valid:
    idx = {i for _, i in r.owned}
    if idx & tainted:
      continue
    ruled |= idx
    plans.append(CallPlan(
        key=r.key, module=r.module, method=r.method, param_map=r.owned,
        args_treedef=r.args_treedef, static_leaves=r.static_leaves,
        num_leaves=r.num_leaves,
        per_example=(leaf_sizes is not None and layers.prefers_per_example(
            r.module, r.method, r.in_shapes, r.out.shape, batch,
            sum(leaf_sizes[i] for i in idx)))))
  fallback = tuple(i for i in range(num_leaves)
                   if leaf_is_float[i] and i not in ruled)
  return tuple(plans), fallback


def value_grad_and_factors(
    per_example_loss: Callable[..., jax.Array],
    *,
    reduction: str = "mean",
    per_example: str = "auto",
    factor_dtype: Any = None,
) -> Callable[..., tuple[jax.Array, Any, Factors]]:
  """Per-example losses, the batch gradient and ghost factors in one pass.

  Like :func:`jax.value_and_grad`, returns a function.  With
  ``losses = per_example_loss(params, *args)`` of shape ``f32[B]``::

      losses, grads, factors = value_grad_and_factors(per_example_loss)(params, *args)

  ``grads`` is the gradient of ``mean(losses)`` (``reduction="mean"``) or of
  ``sum(losses)`` (``"sum"``) with respect to ``params`` (the first argument);
  ``factors`` (:class:`Factors`, a pytree) lets the Shapley transformation
  compute ``x_i . d`` for any direction ``d`` without per-example gradients,
  where ``x_i = c * grad l_i``, ``c = 1/B`` or ``1``.  One forward and one
  backward pass; the supported-module interceptors are installed inside the
  traced function, so it works under ``jax.jit`` and ``jax.pmap``.

  ``per_example_loss`` must make ``l_i`` depend on example ``i`` only (every
  array in ``args`` has the batch on its leading axis).

  ``per_example="auto"`` (default): an ``nn.Conv`` call whose kernel and
  bias, times ``B``, take less memory than its factors (a first convolution
  with few input channels: 3x3x1x16 entries against 8x8x(1 + 16) per image)
  keeps its per-example parameter gradients instead, formed in the backward
  pass from the input's kernel taps as soon as its output cotangent exists; the
  cotangent is then not kept (``Factors.calls``) and the convolution's batch
  gradient is their sum.  ``"never"``: every call keeps factors.

  ``factor_dtype``: store the kept factors (inputs and output cotangents of
  floating dtype; not per-example gradients) in this dtype, e.g.
  ``jnp.bfloat16``: half the memory they hold until the contraction, for a
  relative rounding error of ``2**-9`` per entry (the contraction still
  accumulates in float32; measured effect on the values in
  ``docs/bench.md``).  ``None`` (default) keeps the computation dtype.  The
  batch gradient and the losses are not affected.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import optax_shapley as oxs
    >>> model = nn.Dense(2)
    >>> x = jnp.ones((3, 4))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> loss = lambda p, x: jnp.sum(model.apply({"params": p}, x) ** 2, -1)
    >>> losses, grads, factors = oxs.value_grad_and_factors(loss)(params, x)
    >>> losses.shape, grads["kernel"].shape
    ((3,), (4, 2))
    >>> factors
    Factors(batch_size=3, calls={'Dense': 1}, fallback_leaves=0)

  Raises:
    ValueError: ``reduction`` or ``per_example`` unknown, or the loss is not
      of shape ``[B]``.
    UnsupportedModuleError: a module mixes examples (``nn.BatchNorm`` in
      training mode).
  """
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
  if per_example not in ("auto", "never"):
    raise ValueError(f"per_example must be 'auto' or 'never', got {per_example!r}")
  if factor_dtype is not None and not jnp.issubdtype(factor_dtype, jnp.floating):
    raise ValueError(f"factor_dtype must be a floating dtype, got {factor_dtype!r}")
  return _capture(per_example_loss, reduction, per_example, factor_dtype,
                  prove_per_example=True)


def validation_factors(val_loss: Callable[[Any], jax.Array]
                       ) -> Callable[[Any], tuple[jax.Array, Any, Factors]]:
  """:func:`~optax_shapley.value_grad_and_factors` of ``params -> f32[V]`` validation
  losses, for the ghost rule's validation pass.

  That pass closes over its data and only needs each call's factors summed
  over the validation examples, so a call counts as per-example by the
  shape test alone (no second trace at another batch size, no warning), and
  every call keeps factors.
  """
  return _capture(lambda p: val_loss(p).astype(jnp.float32), "mean", "never",
                  None, prove_per_example=False)


def _capture(per_example_loss, reduction, per_example, factor_dtype, *,
             prove_per_example: bool):
  """The function :func:`value_grad_and_factors` returns.
  ``prove_per_example``: trace the loss again at ``B + 1`` to prove which
  calls are per-example (:func:`_batched_keys`), else trust shapes."""

  def fn(params, *args):
    leaves, treedef = jax.tree.flatten(params)
    loss_shape, records, draws = _discover(per_example_loss, params, args)
    if len(loss_shape.shape) != 1:
      raise ValueError(
          "per_example_loss must return one loss per example, shape [B]; got "
          f"shape {loss_shape.shape}")
    batch = loss_shape.shape[0]
    is_float = [jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in leaves]
    batched, why = (_batched_keys(per_example_loss, params, args, batch)
                    if prove_per_example else (None, None))
    _check_dropout(draws, batch, batched)
    if batched == set() and records:
      warnings.warn(
          f"value_grad_and_factors: {why}, so no module call is known to be "
          "per-example and every parameter takes the exact forward-mode "
          "fallback (correct, but it costs a forward-mode pass of the loss "
          "per direction).", stacklevel=2)
    plans, fallback_leaves = _plan(
        records, batch, len(leaves), is_float, batched,
        leaf_sizes=([int(np.size(x)) for x in leaves]
                    if per_example == "auto" else None))
    by_key = {p.key: p for p in plans}
    record_of = {r.key: r for r in records}
    # Under shard_map every probe varies along the batch's axes, even for a
    # call whose output is device-invariant (positions broadcast over the
    # batch): its per-example cotangents must stay on their device.
    data_axes = vma.axes_of(args)

    def probe_for(p):
      out = record_of[p.key]
      axes = tuple(sorted(set(out.out_axes) | set(data_axes)))
      if p.per_example:         # the call's 'params' dict, leaves [B, *leaf]
        return p.module_params({
            i: vma.mark_varying(jnp.zeros((batch,) + jnp.shape(leaves[i]),
                                          jnp.result_type(leaves[i])), axes)
            for _, i in p.param_map})
      return vma.mark_varying(jnp.zeros(out.out.shape, out.out.dtype), axes)

    probes = {p.key: probe_for(p) for p in plans}

    def probed(p, probes):
      counter = collections.Counter()
      inputs = {}

      def interceptor(next_fun, call_args, call_kwargs, context):
        module, method = context.module, context.method_name
        if not layers.is_supported(module, method):
          return next_fun(*call_args, **call_kwargs)
        key = _call_key(counter, module, method)
        arrays = _flatten_call_args(call_args, call_kwargs)[0]
        if key in by_key and by_key[key].per_example:
          inputs[key] = ()
          plan = by_key[key]
          # Varying like the data, so that the custom rule's parameter
          # cotangent (a sum over this device's examples) is psum-ed by the
          # transpose of this cast, outside the rule.
          axes = tuple(sorted(set(data_axes) | set(vma.axes_of(arrays))))
          theta = jax.tree.map(lambda t: vma.mark_varying(t, axes),
                               plan.module_params(jax.tree.leaves(p)))
          return _per_example_call(plan, theta, probes[key], arrays)
        out = next_fun(*call_args, **call_kwargs)
        if key not in by_key:
          return out
        inputs[key] = arrays
        return out + probes[key]

      with nn.intercept_methods(interceptor):
        losses = per_example_loss(p, *args)
      return losses, (losses, inputs)

    _, vjp_fn, (losses, inputs) = jax.vjp(probed, params, probes, has_aux=True)
    missing = set(by_key) - set(inputs)
    if missing:
      raise RuntimeError(f"module calls seen while planning but not when "
                         f"differentiating: {sorted(missing)}")
    cot = vma.mark_varying(
        jnp.full_like(losses, reduction_scale(reduction, batch)),
        vma.varying_axes(losses))
    grads, probe_cts = vjp_fn(cot)
    calls = tuple((inputs[p.key], probe_cts[p.key]) for p in plans)
    if factor_dtype is not None:
      calls = _store_factors(calls, plans, factor_dtype)
    fb = (params, args) if fallback_leaves else None
    factors = Factors(calls=calls, fallback=fb, grads=grads, plans=plans,
                      fallback_leaves=fallback_leaves, loss_fn=per_example_loss,
                      params_treedef=treedef, batch_size=batch,
                      reduction=reduction)
    return losses, grads, factors

  return fn


def _store_factors(calls, plans, dtype):
  """The factors of ``calls`` cast to ``dtype`` (floating arrays only; the
  per-example gradients of ``per_example`` calls are kept as they are).

  The optimization barrier makes the cast copies real buffers: otherwise
  XLA fuses each cast into its consumer, the contraction, and keeps the
  original until then, which saves nothing."""
  cast = lambda x: (x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                    else x)
  out = tuple(c if p.per_example else (tuple(cast(a) for a in c[0]), cast(c[1]))
              for p, c in zip(plans, calls))
  return jax.lax.optimization_barrier(out)


def _per_example_call(plan: CallPlan, theta: dict, delta: dict, arrays):
  """The call ``f(x; theta)`` whose backward pass also returns, as the
  cotangent of ``delta`` (leaves ``[B, *leaf]``), each example's gradient
  of the call's parameters ``c * dl_i/dtheta``.

  The per-example gradients are formed
  (:func:`optax_shapley.layers.conv_per_example_grads`) as
  soon as the output cotangent ``b`` exists, so ``b`` need not be kept, and
  the batch gradient of ``theta`` is their sum, which replaces the
  convolution's own weight-gradient computation (and its transposes of
  ``b``).  The gradient with respect to the inputs is the call's own vjp.
  """
  def apply(theta, arrays):
    call_args, call_kwargs = plan.call_args(arrays)
    return layers.apply_with_params(plan.module, plan.method, theta,
                                    call_args, call_kwargs)

  @jax.custom_vjp
  def call(theta, delta, arrays):
    del delta
    return apply(theta, arrays)

  def fwd(theta, delta, arrays):
    del delta
    return apply(theta, arrays), (theta, arrays)

  def bwd(res, cot):
    theta, (x,) = res      # planned only for calls with one array input
    shares = layers.conv_per_example_grads(plan.module, x, cot)
    theta_ct: dict = {}
    for path, leaf in param_paths(theta):
      set_path(theta_ct, path, shares[path].sum(0).astype(leaf.dtype))
    if jnp.issubdtype(x.dtype, jnp.inexact):
      (x_ct,) = jax.vjp(lambda x: apply(theta, (x,)), x)[1](cot)
    else:                  # integer images: no cotangent
      x_ct = np.zeros(x.shape, jax.dtypes.float0)
    delta_ct: dict = {}
    for path, leaf in param_paths(delta):
      set_path(delta_ct, path, shares[path].astype(leaf.dtype))
    return theta_ct, delta_ct, (x_ct,)

  call.defvjp(fwd, bwd)
  return call(theta, delta, tuple(arrays))
