"""Capture of ghost factors: per-example losses, the batch gradient, and factors.

``value_grad_and_factors(per_example_loss)(params, *args)`` runs one forward
and one backward pass of ``per_example_loss`` with Flax interceptors
(``flax.linen.intercept_methods``) installed inside the traced function
(docs/index.md, "Capture and contraction").  For every call of a supported module (see
:mod:`optax_shapley.layers`) it keeps the call's inputs and adds a zero
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
import jax.numpy as jnp
import numpy as np

from optax_shapley import layers

_REDUCTIONS = ("mean", "sum")


def _scale(reduction: str, batch: int) -> float:
  return 1.0 / batch if reduction == "mean" else 1.0


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic)) or isinstance(
      x, jax.core.Tracer)


@dataclasses.dataclass(frozen=True)
class _CallPlan:
  """Static description of one supported module call (known at trace time)."""
  key: tuple            # (module path, method name, call index)
  module: nn.Module     # unbound clone, used to re-apply with a direction
  method: str
  param_map: tuple      # ((name path inside 'params', leaf index), ...)
  args_treedef: Any     # treedef of (args, kwargs) with arrays as leaves
  static_leaves: tuple  # ((position, value), ...) non-array leaves of args
  num_leaves: int
  per_example: bool = False   # keeps per-example parameter gradients instead


@jax.tree_util.register_pytree_node_class
class Factors:
  """Ghost factors of one batch: what the transform needs for ``x_i . d``.

  ``x_i = c * grad l_i(w)`` is example ``i``'s share of the batch gradient
  (``c = 1/B`` for ``reduction="mean"``, ``1`` for ``"sum"``).

  Attributes:
    calls: per supported module call, ``(inputs, cotangent)``: the array
      inputs of the call (leading axis ``B``) and the output cotangent
      ``b = c * dl/dy``, f[B, ...]; for a call planned ``per_example``
      (its parameters take less memory per example than its factors),
      ``((), x)`` with ``x`` the call's ``'params'`` dict of per-example
      gradient shares ``c * dl_i/dtheta``, leaves f[B, *leaf.shape].
    fallback: ``(params, args)`` kept for the forward-mode fallback, or
      ``None`` when every trainable leaf is owned by a supported call.
    plans: static, one :class:`_CallPlan` per entry of ``calls``.
    fallback_leaves: static, indices (in ``jax.tree.leaves(params)`` order) of
      the leaves contracted by ``jax.jvp``.
    loss_fn: static, the per-example loss (for the fallback).
    params_treedef: static, tree structure of ``params``.
    batch_size: static, ``B`` (the local batch under data parallelism).
    reduction: static, ``"mean"`` or ``"sum"``.
    grads: the batch gradient ``sum_i x_i`` as returned alongside these
      factors (the same arrays, no copy), or ``None``.  It lets the
      transformation recognise gradients an earlier transformation in a
      chain has rescaled (global-norm clipping).
  """

  def __init__(self, calls, fallback, grads, plans, fallback_leaves, loss_fn,
               params_treedef, batch_size, reduction):
    self.calls = calls
    self.fallback = fallback
    self.grads = grads
    self.plans = plans
    self.fallback_leaves = fallback_leaves
    self.loss_fn = loss_fn
    self.params_treedef = params_treedef
    self.batch_size = batch_size
    self.reduction = reduction

  @property
  def scale(self) -> float:
    """``c``: ``1/B`` for a mean reduction, ``1`` for a sum."""
    return _scale(self.reduction, self.batch_size)

  def tree_flatten(self):
    aux = (self.plans, self.fallback_leaves, self.loss_fn, self.params_treedef,
           self.batch_size, self.reduction)
    return (self.calls, self.fallback, self.grads), aux

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  def __repr__(self):
    kinds = collections.Counter(type(p.module).__name__ for p in self.plans)
    return (f"Factors(batch_size={self.batch_size}, calls={dict(kinds)}, "
            f"fallback_leaves={len(self.fallback_leaves)})")


def _vma(x) -> tuple:
  """The mesh axes along which ``x`` varies inside ``shard_map`` (else ())."""
  typeof = getattr(jax, "typeof", None)
  aval = typeof(x) if typeof is not None else None
  axes = getattr(aval, "vma", None)                      # older jax
  if axes is None:                                       # jax >= 0.10
    axes = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
  return tuple(sorted(axes or ()))


def _varying(x, axes: tuple):
  """``x`` marked as varying along ``axes`` (no-op outside ``shard_map``).

  Under ``shard_map`` with ``check_vma``, a probe or cotangent created inside
  the body is device-invariant; the transpose of its implicit broadcast is a
  ``psum``, which would add the examples of all devices together.  Marking it
  varying like the tensor it meets keeps per-example cotangents local.
  """
  have = set(_vma(x))
  axes = tuple(a for a in axes if a not in have)
  if not axes:
    return x
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(x, axes, to="varying")
  return jax.lax.pvary(x, axes)


def _current_trace():
  """The JAX trace active now (None if this JAX does not expose it).

  A module called inside ``jax.lax.scan``, ``jax.vmap``, ``jax.checkpoint``
  or a Flax lifted transform within the loss runs under an inner trace; its
  inputs cannot leave as auxiliary outputs, so such calls are not probed and
  their parameters go to the exact ``jax.jvp`` fallback.
  """
  try:
    from jax._src import core as _core  # pylint: disable=g-import-not-at-top
    return _core.trace_ctx.trace
  except (ImportError, AttributeError):
    return None


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


def _unflatten_call_args(plan: _CallPlan, arrays):
  static = dict(plan.static_leaves)
  it = iter(arrays)
  leaves = [static[i] if i in static else next(it) for i in range(plan.num_leaves)]
  return jax.tree.unflatten(plan.args_treedef, leaves)


def _param_paths(tree, prefix=()):
  """Yields (name path, leaf) for a nested dict of parameters."""
  if isinstance(tree, dict) or hasattr(tree, "items"):
    for k, v in tree.items():
      yield from _param_paths(v, prefix + (k,))
  else:
    yield prefix, tree


def _set_path(tree: dict, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def module_direction(plan: _CallPlan, leaves):
  """The module's ``'params'`` dict built from parameter leaves (a list, or
  any mapping from leaf index to leaf)."""
  out: dict = {}
  for path, idx in plan.param_map:
    _set_path(out, path, leaves[idx])
  return out


def _discover(per_example_loss, params, args):
  """Traces the loss abstractly; returns (loss shape, call records)."""
  records = []

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
    top = _current_trace()

    def interceptor(next_fun, call_args, call_kwargs, context):
      module, method = context.module, context.method_name
      layers.check_no_batch_mixing(module, method, call_kwargs)
      if layers.draws_batch_mask(module, method, call_args, call_kwargs):
        key = _call_key(counter, module, method)
        out = next_fun(*call_args, **call_kwargs)
        records.append(dict(
            key=key, kind="dropout", path="/".join(module.path),
            in_shapes=(jnp.shape(call_args[0]),), out=None, owned=(),
            top_level=False))
        return out
      if not layers.is_supported(module, method):
        return next_fun(*call_args, **call_kwargs)
      key = _call_key(counter, module, method)
      owned = tuple((name, index.get(id(x)))
                    for name, x in _param_paths(module.variables.get("params", {})))
      out = next_fun(*call_args, **call_kwargs)
      arrays, treedef, statics, n = _flatten_call_args(call_args, call_kwargs)
      records.append(dict(
          key=key, module=module.clone(parent=None, name=module.name),
          method=method, owned=owned, out=jax.ShapeDtypeStruct(out.shape, out.dtype)
          if hasattr(out, "shape") else None,
          vma=_vma(out) if hasattr(out, "shape") else (),
          in_shapes=tuple(x.shape for x in arrays), treedef=treedef,
          statics=statics, n=n, top_level=_current_trace() is top))
      return out

    with nn.intercept_methods(interceptor):
      return per_example_loss(p, *a)

  loss_shape = jax.eval_shape(fn, params, [arg_leaves[i] for i in dynamic])
  return loss_shape, records


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
    _, records = _discover(per_example_loss, params, jax.tree.map(grow, args))
  except Exception:  # pylint: disable=broad-except
    # Cannot tell: no call is probed, all leaves fall back.
    return set(), (f"the loss could not be traced with a batch of "
                   f"{batch + 1} (does it fix the batch size?)")
  keys = {r["key"] for r in records
          if (r["out"] is None or r["out"].shape[:1] == (batch + 1,))
          and all(s[:1] == (batch + 1,) for s in r["in_shapes"])}
  return keys, ("no module call's input and output carry the batch on "
                "their leading axis (module calls inside a jax.vmap over "
                "examples, nn.scan or nn.remat are not probed)")


def _check_dropout(records, batch, batched_keys):
  """Raises for a dropout mask drawn across the batch (see layers)."""
  for r in records:
    if r.get("kind") != "dropout":
      continue
    batched = (r["key"] in batched_keys if batched_keys is not None
               else r["in_shapes"][0][:1] == (batch,))
    if batched:
      raise layers.dropout_error(r["path"])


def _prefers_per_example(r, batch, leaf_sizes) -> bool:
  """Whether the call's per-example parameter gradients (``B`` times its
  parameters) take less memory than its factors (its array inputs and its
  output cotangent): small kernels applied at many positions, such as a
  first convolution.  This is the per-layer choice between ghost
  factors and per-sample gradients of differentially private training
  (Bu et al. 2022, "Scalable and efficient training of large convolutional
  neural networks with differential privacy").

  Only ``nn.Conv`` calls without feature groups, a kernel mask, input
  dilation or a custom ``conv_general_dilated`` / ``promote_dtype``, padded
  ``"SAME"``, ``"VALID"`` or explicitly, qualify: their
  per-example kernel gradients come from strided slices of the input
  (:func:`_conv_per_example_grads`), whereas the generic per-example vjp
  becomes a batch-grouped convolution that XLA transposes through
  cotangent-sized buffers, which loses what it saves."""
  m = r["module"]
  if (type(m) is not nn.Conv or r["method"] != "__call__"
      or m.feature_group_count != 1 or m.mask is not None
      # A user-supplied convolution or dtype promotion computes something
      # the tap rule does not know.
      or getattr(m, "conv_general_dilated", None) is not None
      or getattr(m, "conv_general_dilated_cls", None) is not None
      or getattr(m, "promote_dtype", nn.dtypes.promote_dtype)
      is not nn.dtypes.promote_dtype
      or len(r["in_shapes"]) != 1
      or _conv_geometry(m, r["in_shapes"][0]) is None):
    return False
  params = sum(leaf_sizes[i] for _, i in r["owned"])
  factors = sum(int(np.prod(s)) for s in r["in_shapes"]) + int(
      np.prod(r["out"].shape))
  return batch * params < factors


def _plan(records, batch, num_leaves, leaf_is_float, batched_keys=None,
          leaf_sizes=None):
  """Chooses which calls get probes; the rest of the leaves fall back.
  With ``leaf_sizes`` (parameter leaf sizes), calls whose per-example
  gradients are smaller than their factors are planned ``per_example``."""
  valid, tainted = [], set()
  for r in records:
    matched = [i for _, i in r["owned"] if i is not None]
    ok = (r["top_level"] and bool(r["owned"]) and len(matched) == len(r["owned"])
          and r["out"] is not None and r["out"].shape[:1] == (batch,)
          and jnp.issubdtype(r["out"].dtype, jnp.inexact)
          and all(s[:1] == (batch,) for s in r["in_shapes"])
          and (batched_keys is None or r["key"] in batched_keys))
    if ok:
      valid.append(r)
    else:
      tainted.update(matched)
  plans, ruled = [], set()
  for r in valid:
    idx = {i for _, i in r["owned"]}
    if idx & tainted:
      continue
    ruled |= idx
    plans.append(_CallPlan(
        key=r["key"], module=r["module"], method=r["method"],
        param_map=r["owned"], args_treedef=r["treedef"],
        static_leaves=r["statics"], num_leaves=r["n"],
        per_example=(leaf_sizes is not None
                     and _prefers_per_example(r, batch, leaf_sizes))))
  fallback = tuple(i for i in range(num_leaves)
                   if leaf_is_float[i] and i not in ruled)
  return tuple(plans), fallback


def value_grad_and_factors(
    per_example_loss: Callable[..., jax.Array],
    *,
    reduction: str = "mean",
    per_example: str = "auto",
    factor_dtype: Any = None,
    _data_closed_over: bool = False,
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

  Raises:
    ValueError: ``reduction`` or ``per_example`` unknown, or the loss is not
      of shape ``[B]``.
    UnsupportedModuleError: a module mixes examples (``nn.BatchNorm`` in
      training mode).
  """
  if reduction not in _REDUCTIONS:
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
  if per_example not in ("auto", "never"):
    raise ValueError(f"per_example must be 'auto' or 'never', got {per_example!r}")
  if factor_dtype is not None and not jnp.issubdtype(factor_dtype, jnp.floating):
    raise ValueError(f"factor_dtype must be a floating dtype, got {factor_dtype!r}")

  def fn(params, *args):
    leaves, treedef = jax.tree.flatten(params)
    loss_shape, records = _discover(per_example_loss, params, args)
    if len(loss_shape.shape) != 1:
      raise ValueError(
          "per_example_loss must return one loss per example, shape [B]; got "
          f"shape {loss_shape.shape}")
    batch = loss_shape.shape[0]
    is_float = [jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in leaves]
    # The validation pass of the ghost rule closes over its data and only
    # needs each call's summed factors, so there the shape test suffices.
    batched, why = ((None, None) if _data_closed_over
                    else _batched_keys(per_example_loss, params, args, batch))
    _check_dropout(records, batch, batched)
    records = [r for r in records if r.get("kind") != "dropout"]
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
    out_of = {r["key"]: r["out"] for r in records}
    vma_of = {r["key"]: r["vma"] for r in records}
    # Under shard_map every probe varies along the batch's axes, even for a
    # call whose output is device-invariant (positions broadcast over the
    # batch): its per-example cotangents must stay on their device.
    data_axes = tuple(sorted(set().union(
        *(_vma(a) for a in jax.tree.leaves(args) if hasattr(a, "shape")))))
    def probe_for(p):
      axes = tuple(sorted(set(vma_of[p.key]) | set(data_axes)))
      if p.per_example:         # the call's 'params' dict, leaves [B, *leaf]
        return module_direction(p, {
            i: _varying(jnp.zeros((batch,) + jnp.shape(leaves[i]),
                                  jnp.result_type(leaves[i])), axes)
            for _, i in p.param_map})
      return _varying(jnp.zeros(out_of[p.key].shape, out_of[p.key].dtype), axes)

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
          axes = tuple(sorted(set(data_axes).union(*(_vma(a) for a in arrays))))
          theta = jax.tree.map(lambda t: _varying(t, axes),
                               module_direction(plan, jax.tree.leaves(p)))
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
    cot = _varying(jnp.full_like(losses, _scale(reduction, batch)),
                   _vma(losses))
    grads, probe_cts = vjp_fn(cot)
    calls = tuple((inputs[p.key], probe_cts[p.key]) for p in plans)
    if factor_dtype is not None:
      calls = _store_factors(calls, plans, factor_dtype)
    fb = (params, args) if fallback_leaves else None
    factors = Factors(calls, fb, grads, plans, fallback_leaves,
                      per_example_loss, treedef, batch, reduction)
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


def _conv_geometry(module: nn.Conv, in_shape: tuple):
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


def _conv_per_example_grads(module: nn.Conv, x: jax.Array,
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
      geometry covered by :func:`_conv_geometry`.
    x: f[B, *spatial, C_in], the call's input.
    cot: f[B, *spatial_out, C_out]: the output cotangent ``b``.

  Returns:
    ``{("kernel",): [B, *kernel_size, C_in, C_out], ("bias",): [B, C_out]}``
    in float32 (float64 for float64 inputs); no bias entry when ``use_bias``
    is false.
  """
  # Tie the input to the cotangent: otherwise XLA slices the taps in the
  # forward pass (they depend on x only) and keeps them to the end.
  x, cot = jax.lax.optimization_barrier((x, cot))
  ks, strides, dil, pads = _conv_geometry(module, x.shape)
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


def _per_example_call(plan: _CallPlan, theta: dict, delta: dict, arrays):
  """The call ``f(x; theta)`` whose backward pass also returns, as the
  cotangent of ``delta`` (leaves ``[B, *leaf]``), each example's gradient
  of the call's parameters ``c * dl_i/dtheta``.

  The per-example gradients are formed (:func:`_conv_per_example_grads`) as
  soon as the output cotangent ``b`` exists, so ``b`` need not be kept, and
  the batch gradient of ``theta`` is their sum, which replaces the
  convolution's own weight-gradient computation (and its transposes of
  ``b``).  The gradient with respect to the inputs is the call's own vjp.
  """
  def apply(theta, arrays):
    call_args, call_kwargs = _unflatten_call_args(plan, arrays)
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
    shares = _conv_per_example_grads(plan.module, x, cot)
    theta_ct: dict = {}
    for path, leaf in _param_paths(theta):
      _set_path(theta_ct, path, shares[path].sum(0).astype(leaf.dtype))
    if jnp.issubdtype(x.dtype, jnp.inexact):
      (x_ct,) = jax.vjp(lambda x: apply(theta, (x,)), x)[1](cot)
    else:                  # integer images: no cotangent
      x_ct = np.zeros(x.shape, jax.dtypes.float0)
    delta_ct: dict = {}
    for path, leaf in _param_paths(delta):
      _set_path(delta_ct, path, shares[path].astype(leaf.dtype))
    return theta_ct, delta_ct, (x_ct,)

  call.defvjp(fwd, bwd)
  return call(theta, delta, tuple(arrays))


def contract(factors: Factors, directions: Any,
             skip_leaves: tuple[int, ...] = (),
             skip_calls: tuple[int, ...] = ()) -> jax.Array:
  """``x_i . d_e`` for every example ``i`` and every direction ``e``.

  Args:
    factors: from :func:`value_grad_and_factors`.
    directions: a tree like ``params`` whose leaves carry a leading axis
      ``E`` (one direction per estimator).
    skip_leaves: indices (``jax.tree.leaves(params)`` order) of leaves whose
      direction is known to be zero (frozen parameters): calls owning only
      such leaves and fallback work on them are skipped.
    skip_calls: indices into ``factors.plans`` of calls contracted elsewhere
      (the ghost rule).

  Returns:
    f32[B, E] where entry ``(i, e)`` is ``c * grad l_i(w) . d_e``.
  """
  d_leaves = factors.params_treedef.flatten_up_to(directions)
  num_dirs = d_leaves[0].shape[0]
  total = jnp.zeros((factors.batch_size, num_dirs), jnp.float32)
  skip = frozenset(skip_leaves)
  for n, (plan, (arrays, cotangent)) in enumerate(zip(factors.plans,
                                                      factors.calls)):
    if n in skip_calls or (skip and all(i in skip for _, i in plan.param_map)):
      continue
    if plan.per_example:       # cotangent: the per-example gradients
      shares = dict(_param_paths(cotangent))
      for path, i in plan.param_map:
        x, d = shares[path], d_leaves[i]
        total = total + jnp.tensordot(
            x.astype(jnp.float32), d.astype(jnp.float32),
            axes=(tuple(range(1, x.ndim)), tuple(range(1, d.ndim))))
      continue
    call_args, call_kwargs = _unflatten_call_args(plan, arrays)

    def one(d_mod, plan=plan, call_args=call_args, call_kwargs=call_kwargs,
            cotangent=cotangent):
      return layers.contract(plan.module, plan.method, d_mod, call_args,
                             call_kwargs, cotangent)

    d_mod = module_direction(plan, d_leaves)
    total = total + jax.vmap(one, out_axes=1)(d_mod)
  fb = tuple(i for i in factors.fallback_leaves if i not in skip)
  if fb:
    total = total + _fallback_contract(factors, d_leaves, fb)
  return total


def _fallback_contract(factors: Factors, d_leaves, fb) -> jax.Array:
  """Exact ``c * jvp(l_i, d)`` restricted to the leaves ``fb``, f32[B, E]."""
  params, args = factors.fallback
  leaves = factors.params_treedef.flatten_up_to(params)

  def loss_of(fb_vals):
    full = list(leaves)
    for i, v in zip(fb, fb_vals):
      full[i] = v
    return factors.loss_fn(jax.tree.unflatten(factors.params_treedef, full), *args)

  primals = tuple(leaves[i] for i in fb)

  def one(tangent):
    tangent = tuple(t.astype(p.dtype) for t, p in zip(tangent, primals))
    # A tangent that varies over a shard_map axis needs a primal that does.
    prim = tuple(_varying(p, tuple(sorted(set(_vma(t)) - set(_vma(p)))))
                 for p, t in zip(primals, tangent))
    return jax.jvp(loss_of, (prim,), (tangent,))[1]

  tangents = tuple(d_leaves[i] for i in fb)
  out = jax.vmap(one, out_axes=1)(tangents)
  return out.astype(jnp.float32) * factors.scale


def per_example_grads(factors: Factors, like: Any,
                      skip_leaves: tuple[int, ...] = ()) -> Any:
  """The per-example gradient shares ``x_i = c * grad l_i(w)``, formed.

  ``x_i . d`` (:func:`contract`) is linear in ``d``, so its reverse-mode
  Jacobian with respect to ``d`` *is* the stack of per-example gradients: one
  transposed contraction per example, through the same layer rules and the
  same forward-mode fallback.  Costs about ``B`` backward passes of the
  weight gradients and ``B`` times the parameters' memory; used by estimators
  that are not linear in ``x_i`` (``"removal"``, ``"coalitions"``), not by the
  ghost path.

  Args:
    factors: from :func:`value_grad_and_factors`.
    like: a tree like ``params`` (e.g. the batch gradient), for shapes.
    skip_leaves: as in :func:`contract`; those leaves come out as zeros.

  Returns:
    A tree like ``params`` whose leaves are f32[B, *leaf.shape]; zeros for
    leaves that no call or fallback owns (non-float or unused) or skipped.
  """
  # Under shard_map the direction must vary like the factors: the transpose
  # of a device-invariant input is a psum, which would add the devices' x_i.
  axes = tuple(sorted({a for x in jax.tree.leaves((factors.calls, factors.fallback))
                       for a in _vma(x)}))
  zeros = jax.tree.map(
      lambda x: _varying(jnp.zeros(jnp.shape(x), jnp.float32), axes), like)
  expand = lambda d: jax.tree.map(lambda x: x[None], d)
  _, vjp = jax.vjp(lambda d: contract(factors, expand(d), skip_leaves)[:, 0],
                   zeros)
  basis = _varying(jnp.eye(factors.batch_size, dtype=jnp.float32), axes)
  return jax.vmap(lambda e: vjp(e)[0])(basis)
