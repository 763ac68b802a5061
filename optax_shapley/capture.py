"""Capture of ghost factors: per-example losses, the batch gradient, and factors.

``value_grad_and_factors(per_example_loss)(params, *args)`` runs one forward
and one backward pass of ``per_example_loss`` with Flax interceptors
(``flax.linen.intercept_methods``) installed inside the traced function
(DESIGN.md section 4).  For every call of a supported module (see
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


@jax.tree_util.register_pytree_node_class
class Factors:
  """Ghost factors of one batch: what the transform needs for ``x_i . d``.

  ``x_i = c * grad l_i(w)`` is example ``i``'s share of the batch gradient
  (``c = 1/B`` for ``reduction="mean"``, ``1`` for ``"sum"``).

  Attributes:
    calls: per supported module call, ``(inputs, cotangent)``: the array
      inputs of the call (leading axis ``B``) and the output cotangent
      ``b = c * dl/dy``, f[B, ...].
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
  """The module's ``'params'`` dict built from a list of parameter leaves."""
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
  Returns the empty set (every leaf then goes to the exact fallback) when
  no argument is batched or the loss cannot be traced at another size.
  """
  def grow(x):
    if _is_array(x) and getattr(x, "ndim", 0) and x.shape[0] == batch:
      return jax.ShapeDtypeStruct((batch + 1,) + tuple(x.shape[1:]), x.dtype)
    return x
  if not any(_is_array(x) and getattr(x, "ndim", 0) and x.shape[0] == batch
             for x in jax.tree.leaves(args)):
    return set()      # data closed over: nothing proves a call per-example
  try:
    _, records = _discover(per_example_loss, params, jax.tree.map(grow, args))
  except Exception:  # pylint: disable=broad-except
    return set()      # cannot tell: no call is probed, all leaves fall back
  return {r["key"] for r in records
          if (r["out"] is None or r["out"].shape[:1] == (batch + 1,))
          and all(s[:1] == (batch + 1,) for s in r["in_shapes"])}


def _check_dropout(records, batch, batched_keys):
  """Raises for a dropout mask drawn across the batch (see layers)."""
  for r in records:
    if r.get("kind") != "dropout":
      continue
    batched = (r["key"] in batched_keys if batched_keys is not None
               else r["in_shapes"][0][:1] == (batch,))
    if batched:
      raise layers.dropout_error(r["path"])


def _plan(records, batch, num_leaves, leaf_is_float, batched_keys=None):
  """Chooses which calls get probes; the rest of the leaves fall back."""
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
        static_leaves=r["statics"], num_leaves=r["n"]))
  fallback = tuple(i for i in range(num_leaves)
                   if leaf_is_float[i] and i not in ruled)
  return tuple(plans), fallback


def value_grad_and_factors(
    per_example_loss: Callable[..., jax.Array],
    *,
    reduction: str = "mean",
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

  Raises:
    ValueError: ``reduction`` unknown, or the loss is not of shape ``[B]``.
    UnsupportedModuleError: a module mixes examples (``nn.BatchNorm`` in
      training mode).
  """
  if reduction not in _REDUCTIONS:
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")

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
    batched = (None if _data_closed_over
               else _batched_keys(per_example_loss, params, args, batch))
    _check_dropout(records, batch, batched)
    records = [r for r in records if r.get("kind") != "dropout"]
    plans, fallback_leaves = _plan(records, batch, len(leaves), is_float, batched)
    by_key = {p.key: p for p in plans}
    out_of = {r["key"]: r["out"] for r in records}
    vma_of = {r["key"]: r["vma"] for r in records}
    # Under shard_map every probe varies along the batch's axes, even for a
    # call whose output is device-invariant (positions broadcast over the
    # batch): its per-example cotangents must stay on their device.
    data_axes = tuple(sorted(set().union(
        *(_vma(a) for a in jax.tree.leaves(args) if hasattr(a, "shape")))))
    probes = {p.key: _varying(jnp.zeros(out_of[p.key].shape, out_of[p.key].dtype),
                              tuple(sorted(set(vma_of[p.key]) | set(data_axes))))
              for p in plans}

    def probed(p, probes):
      counter = collections.Counter()
      inputs = {}

      def interceptor(next_fun, call_args, call_kwargs, context):
        module, method = context.module, context.method_name
        if not layers.is_supported(module, method):
          return next_fun(*call_args, **call_kwargs)
        key = _call_key(counter, module, method)
        out = next_fun(*call_args, **call_kwargs)
        if key not in by_key:
          return out
        inputs[key] = _flatten_call_args(call_args, call_kwargs)[0]
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
    fb = (params, args) if fallback_leaves else None
    factors = Factors(calls, fb, grads, plans, fallback_leaves,
                      per_example_loss, treedef, batch, reduction)
    return losses, grads, factors

  return fn


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
