r"""How the optimizer's step ``g -> u(g)`` depends on the gradient, at trace time.

Read from ``jax.make_jaxpr`` of the update with the optimizer state frozen,
so it costs nothing at run time.  Two facts are derived:

- *frozen leaves*: output leaves that do not depend on ``g`` at all
  (``optax.set_to_zero`` on a frozen backbone);
- *coordinate-wise*: every output entry ``u_l[k]`` (leaf ``l``, flat index
  ``k``) depends on ``g`` only through ``g_l[k]``, i.e. the Jacobian
  ``du/dg`` is diagonal,

  .. math::

      \frac{\partial u_{l}[k]}{\partial g_{m}[j]} = 0
      \quad \text{unless } (m, j) = (l, k),

  so the secant metric is the exact elementwise difference quotient
  ``-(u(g) - u(0)) / g``.

The analysis is an abstract interpretation of the jaxpr: each variable is
either independent of ``g``, a coordinate-wise function of one input leaf
(same shape as that leaf, entry ``k`` from entry ``k``), or *mixed*.  It is
sound (it may answer "not coordinate-wise" for an optimizer that is, never
the reverse):

- elementwise primitives (:data:`ELEMENTWISE`) keep a coordinate-wise value
  when every ``g``-dependent operand has exactly the output's shape and all
  come from the same leaf (``g``-independent operands may be any shape:
  scalars, or constants of the state such as Adam's moments);
- ``broadcast_in_dim`` / ``reshape`` of a ``g``-dependent value only when
  they leave its shape unchanged;
- call primitives (``jit``, ``custom_jvp_call``, ``custom_vjp_call``,
  ``closed_call``, ``remat``) are analysed through their sub-jaxprs;
- ``cond`` whose predicate does not depend on ``g``: the join of its
  branches;
- anything else touching a ``g``-dependent value (reductions,
  ``dot_general``, ``transpose``, ``gather``, ``scan``, ``while``...) makes
  its outputs mixed.

The gradient is assumed finite: ``is_finite`` of an input leaf itself is
then the constant ``True``.  This is what lets ``optax.apply_if_finite``
(a ``cond`` on ``all(isfinite(g))``) be seen through; it is harmless because
a step with a non-finite gradient is never credited (its shares are not
finite, so the add-up check skips it), and the points where the metrics
evaluate ``u`` (``0``, ``g / 2``, ``g``, coalitions of finite shares) are
finite whenever ``g`` is.  A ``custom_jvp`` rule is assumed to be the
derivative of its primal (the forward-mode pass of the metrics reads it).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
from jax.extend import core as jex_core

UpdateFn = Callable[[Any], Any]   # g -> u(g), the inner step with state frozen

#: Primitives that act entry by entry on operands of one shape (scalars
#: broadcast).  ``select_n`` and ``clamp`` included: with a ``g``-dependent
#: predicate or bound of a different shape (a scalar) the rule below makes
#: the output mixed.
ELEMENTWISE = frozenset({
    "abs", "acos", "acosh", "add", "and", "asin", "asinh", "atan", "atan2",
    "atanh", "cbrt", "ceil", "clamp", "convert_element_type", "copy", "copy_p",
    "cos", "cosh", "div", "eq", "erf", "erf_inv", "erfc", "exp", "exp2",
    "expm1", "floor", "ge", "gt", "imag", "integer_pow", "is_finite", "le",
    "lgamma", "digamma", "log", "log1p", "logistic", "lt", "max", "min", "mul",
    "ne", "neg", "nextafter", "not", "or", "pow", "real", "reduce_precision",
    "rem", "round", "rsqrt", "select_n", "sign", "sin", "sinh", "sqrt",
    "square", "stop_gradient", "sub", "tan", "tanh", "xor",
})

#: Call primitives analysed through a sub-jaxpr, and the parameter holding it
#: (its inputs are the equation's inputs, its outputs the equation's).
CALLS = {
    "pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat": "jaxpr", "remat2": "jaxpr", "checkpoint": "jaxpr",
}

_SHAPE_KEEPING = frozenset({"broadcast_in_dim", "reshape", "squeeze",
                            "expand_dims"})
_MIXED = -1


class _Dep(NamedTuple):
  """A ``g``-dependent variable: ``leaf`` is the one input leaf it is a
  coordinate-wise function of (``_MIXED`` if none); ``raw``: it is that
  input leaf itself (finite whenever ``g`` is)."""
  leaf: int
  raw: bool = False


_MIXED_DEP = _Dep(_MIXED)


class UpdateDependence(NamedTuple):
  """What :func:`analyse` found.

  Attributes:
    frozen: output leaves (``jax.tree.leaves`` order) whose update ignores
      ``g``.
    coordinatewise: output leaf ``l`` entry ``k`` depends on ``g`` only
      through input leaf ``l`` entry ``k`` (frozen leaves trivially do), and
      the update's tree has the gradient's leaves in the same order.
    mixing: the primitives at which a ``g``-dependent value stopped being
      coordinate-wise (sorted names; some may feed no output), to say why
      ``coordinatewise`` is ``False``.
  """
  frozen: tuple[int, ...]
  coordinatewise: bool
  mixing: tuple[str, ...] = ()


def analyse(update_fn: UpdateFn, g) -> UpdateDependence:
  """The dependence of ``update_fn(g)`` on ``g``, from its jaxpr.

  Args:
    update_fn: ``g -> u(g)`` with the optimizer state held fixed.
    g: a gradient (only its shapes and dtypes are read).
  """
  closed = jax.make_jaxpr(update_fn)(g)
  in_leaves = jax.tree.leaves(g)
  out_shape = jax.eval_shape(update_fn, g)
  same_tree = (jax.tree.structure(out_shape) == jax.tree.structure(g))
  env = {v: _Dep(l, raw=True) for l, v in enumerate(closed.jaxpr.invars)}
  mixing = set()
  outs = _run(closed.jaxpr, env, mixing)
  frozen = tuple(i for i, d in enumerate(outs) if d is None)
  coordinatewise = same_tree and len(outs) == len(in_leaves) and all(
      d is None or d.leaf == l for l, d in enumerate(outs))
  return UpdateDependence(frozen=frozen, coordinatewise=coordinatewise,
                          mixing=tuple(sorted(mixing)))


def frozen_leaves(update_fn: UpdateFn, g) -> tuple[int, ...]:
  """Leaves (in ``jax.tree.leaves`` order) whose update ignores the gradient.

  ``optax.set_to_zero`` on a frozen backbone (inside ``optax.multi_transform``
  or a chain) makes ``u(g)`` constant in those leaves: every metric is zero
  there, so they are skipped by the contraction and the ``sgd`` and
  ``fixed_state`` metrics, which do not look at the update, are zeroed there
  too.  See :func:`analyse`.
  """
  return analyse(update_fn, g).frozen


def is_coordinatewise(update_fn: UpdateFn, g) -> bool:
  """Whether ``du/dg`` is diagonal (see :func:`analyse`): Adam, AdamW, SGD
  with or without momentum, RMSProp, Adagrad, Lion are; global-norm
  clipping, Adafactor or any reduction over the gradient are not."""
  return analyse(update_fn, g).coordinatewise


def _read(env, v):
  if isinstance(v, jex_core.Literal):
    return None
  return env.get(v)


def _shape(v):
  return tuple(v.aval.shape)


def _run(jaxpr, env, mixing: set) -> list:
  """Abstract values of ``jaxpr``'s outputs given those of its inputs in
  ``env`` (``None``: independent of ``g``); adds to ``mixing`` the names of
  the primitives that made a value mixed."""
  env = dict(env)
  for eqn in jaxpr.eqns:
    ins = [_read(env, v) for v in eqn.invars]
    outs = _equation(eqn, ins, mixing)
    if (any(d == _MIXED_DEP for d in outs)
        and not any(d is not None and d.leaf == _MIXED for d in ins)
        and eqn.primitive.name not in CALLS and eqn.primitive.name != "cond"):
      mixing.add(eqn.primitive.name)
    for v, d in zip(eqn.outvars, outs):
      if d is not None:
        env[v] = d
  return [_read(env, v) for v in jaxpr.outvars]


def _join(deps) -> _Dep | None:
  """One value from several ``g``-dependent sources, entry by entry."""
  deps = [d for d in deps if d is not None]
  if not deps:
    return None
  leaves = {d.leaf for d in deps}
  return _Dep(leaves.pop()) if len(leaves) == 1 else _MIXED_DEP


def _equation(eqn, ins, mixing) -> list:
  name = eqn.primitive.name
  n_out = len(eqn.outvars)
  if all(d is None for d in ins):
    return [None] * n_out
  if name == "is_finite" and ins[0] is not None and ins[0].raw:
    return [None]         # g is finite (see the module docstring)
  if name in ELEMENTWISE or name in _SHAPE_KEEPING:
    out_shape = _shape(eqn.outvars[0])
    if all(_shape(v) == out_shape for v, d in zip(eqn.invars, ins)
           if d is not None):
      return [_join(ins)] * n_out
    return [_MIXED_DEP] * n_out
  if name in CALLS and CALLS[name] in eqn.params:
    return _call(eqn.params[CALLS[name]], ins, n_out, mixing)
  if name == "cond" and ins[0] is None:
    outs = [_call(branch, ins[1:], n_out, mixing)
            for branch in eqn.params["branches"]]
    return [_join(col) for col in zip(*outs)]
  return [_MIXED_DEP] * n_out


def _call(sub, ins, n_out, mixing) -> list:
  jaxpr = getattr(sub, "jaxpr", sub)
  if len(jaxpr.invars) != len(ins) or len(jaxpr.outvars) != n_out:
    mixing.add("call with unmatched arguments")
    return [_MIXED_DEP] * n_out
  return _run(jaxpr, {v: d for v, d in zip(jaxpr.invars, ins) if d is not None},
              mixing)
