"""Which mesh axes an array varies along inside ``jax.shard_map``.

Under ``shard_map`` with ``check_vma`` (the default) every value is typed as
device-invariant or varying along some mesh axes.  A probe or cotangent
created inside the body is invariant, and the transpose of its implicit
broadcast against a varying value is a ``psum``: per-example cotangents of
all devices would be added together.  The capture and the contraction mark
such values varying like the data they meet, so per-example quantities stay
on their device.  Outside ``shard_map`` both functions are no-ops.
"""

from __future__ import annotations

import jax


def varying_axes(x) -> tuple:
  """The mesh axes along which ``x`` varies inside ``shard_map`` (else ())."""
  manual = getattr(jax.typeof(x), "manual_axis_type", None)
  return tuple(sorted(getattr(manual, "varying", None) or ()))


def mark_varying(x, axes: tuple):
  """``x`` marked as varying along ``axes`` (those it does not vary along
  already); unchanged when there are none."""
  have = set(varying_axes(x))
  axes = tuple(a for a in axes if a not in have)
  return jax.lax.pcast(x, axes, to="varying") if axes else x


def axes_of(tree) -> tuple:
  """The union of :func:`varying_axes` over the array leaves of ``tree``."""
  return tuple(sorted({a for x in jax.tree.leaves(tree) if hasattr(x, "shape")
                       for a in varying_axes(x)}))
