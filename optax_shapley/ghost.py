r"""Ghost (pairwise) contraction for ``nn.Dense``: train against validation factors.

For a Dense layer ``y = a W + c`` with an elementwise metric (so the
kernel's direction is ``d_W = S * G``, ``S`` the metric's elementwise scale,
``G = grad_W L(wbar) = sum_r a'_r b'_r^T`` over the validation tokens ``r``
at the evaluation point), factoring the scale to rank ``K``,
``S ~= sum_k r_k q_k^T``, gives (the "Models and layers" guide, "Contraction modes")

.. math::

    x_i \cdot d_W = \sum_{s, k, r} \bigl((a_{is} \odot r_k) \cdot a'_r\bigr)
                                   \bigl((b_{is} \odot q_k) \cdot b'_r\bigr)

at a cost of ``B T R K (d_in + d_out)`` multiply-adds (``R = V T'``) instead
of ``B T d_in d_out`` for the exact rule; no per-example gradient and no
``d_W`` is formed.  ``K = 1`` is the paper's Linearized Ghost Approximation
(Ding et al. 2026).  Exact when ``M`` has rank ``<= K`` (the ``sgd`` metric);
otherwise the error is that of the rank-``K`` factorisation.

The factorisation is a subspace iteration (Halko, Martinsson, Tropp 2011,
Algorithm 4.4) started from the all-ones vector and its first ``K - 1``
cosine modes: ``S ~= U (U^T S W) W^T`` with orthonormal ``U``, ``W``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def factor_log_metric(m: jax.Array, weight: jax.Array | None = None,
                      sweeps: int = 1):
  """Rank-1 ``(r, q)`` from the two-way additive model of ``log m``.

  ``log m_jl ~= alpha_j + beta_l`` by (weighted) row and column means, so
  ``m ~= exp(alpha) exp(beta)^T``: Adafactor's factorisation (Shazeer and
  Stern 2018) applied to the metric's log-magnitude, which keeps the
  multiplicative ``1 / sqrt(vhat)`` structure of Adam and is not pulled by a
  few huge entries (``vhat = 0`` rows).  ``weight`` f[d_in, d_out] >= 0
  (e.g. ``|G|``) says which entries matter.  Entries ``m <= 0`` (a secant of
  Adam's non-monotone update, or a metric zeroed where it was not finite)
  get weight 0: the positive factors cannot represent them, and the ghost
  rule's spot check measures what that costs.  The row and column sums are
  matrix-vector products, so the kernel is read twice (once to form the
  weighted logs, once by the products), not once per sum.  ``sweeps``
  rounds of backfitting (alternating weighted least squares of the additive
  model); with weights that are not a product of a row and a column factor,
  more sweeps move the fit closer to the weighted least-squares one.

  Returns:
    ``r`` f32[d_in, 1], ``q`` f32[d_out, 1], both positive.
  """
  m = m.astype(jnp.float32)
  pos = m > 0
  lm = jnp.log(jnp.where(pos, m, 1.0))
  w = jnp.ones_like(m) if weight is None else weight.astype(jnp.float32)
  w = jnp.where(pos, w + 1e-12, 0.0)
  wl = w * lm
  ones_out = jnp.ones((m.shape[1],), jnp.float32)
  ones_in = jnp.ones((m.shape[0],), jnp.float32)
  row_w, row_wl = w @ ones_out, wl @ ones_out                  # [d_in]
  col_w, col_wl = ones_in @ w, ones_in @ wl                    # [d_out]
  safe = lambda x: jnp.where(x > 0, x, 1.0)
  grand = jnp.sum(row_wl) / safe(jnp.sum(row_w))
  alpha = jnp.where(row_w > 0, row_wl / safe(row_w), grand) - grand
  # beta_l = sum_j w_jl (lm_jl - alpha_j) / sum_j w_jl, then alternate.
  beta = jnp.where(col_w > 0, (col_wl - alpha @ w) / safe(col_w), grand)
  for _ in range(sweeps - 1):
    alpha = jnp.where(row_w > 0, (row_wl - w @ beta) / safe(row_w), 0.0)
    beta = jnp.where(col_w > 0, (col_wl - alpha @ w) / safe(col_w), grand)
  return jnp.exp(alpha)[:, None], jnp.exp(beta)[:, None]


def factor_metric(m: jax.Array, rank: int = 1, iterations: int = 2):
  """``(r, q)`` with ``m ~= r @ q.T``: ``r`` f32[d_in, K], ``q`` f32[d_out, K].

  Args:
    m: f32[d_in, d_out], the elementwise scale ``S`` of one kernel.
    rank: ``K``.
    iterations: subspace-iteration steps (each two matmuls with ``m``).
  """
  d_in, d_out = m.shape
  k = min(rank, d_in, d_out)
  m = m.astype(jnp.float32)
  grid = np.arange(d_out)[:, None] + 0.5
  start = np.cos(np.pi * grid * np.arange(k)[None, :] / d_out)   # [d_out, K]
  w = jnp.asarray(start / np.linalg.norm(start, axis=0), jnp.float32)
  for _ in range(iterations):
    u, _ = jnp.linalg.qr(m @ w)
    w, _ = jnp.linalg.qr(m.T @ u)
  core = u.T @ m @ w                                              # [K, K]
  return u, w @ core.T


def ghost_values(inputs, cotangent, val_inputs, val_cotangent, r, q,
                 bias_direction=None):
  """``x_i . d`` for one Dense call by the ghost rule, f32[B].

  Args:
    inputs: ``a``, f[B, ..., d_in], the call's training inputs.
    cotangent: ``b = c dl_i/dy``, f[B, ..., d_out].
    val_inputs, val_cotangent: ``a'``, ``b'`` of the same call in the
      validation pass at the evaluation point, any leading shape (flattened
      to the ``R`` validation tokens); ``b'`` is the cotangent of the mean
      validation loss.
    r, q: the metric factors, f32[d_in, K] and f32[d_out, K].
    bias_direction: the bias's direction ``d_c`` f[d_out] (exact, cheap), or
      ``None`` without a bias.

  Returns:
    f32[B]: ``sum_{s,k,r} ((a_is*r_k).a'_r)((b_is*q_k).b'_r) + sum_s b_is.d_c``.
  """
  f32 = jnp.float32
  batch = inputs.shape[0]
  a = inputs.astype(f32)                                            # [B,...,i]
  b = cotangent.astype(f32)                                         # [B,...,o]
  ap = val_inputs.reshape(-1, val_inputs.shape[-1]).astype(f32)     # [R,i]
  bp = val_cotangent.reshape(-1, val_cotangent.shape[-1]).astype(f32)
  k, num_r = r.shape[1], ap.shape[0]
  # The metric's factors scale the validation side ([R, d] rows, few), not
  # the training side: (a * r_k) . a'_r = a . (r_k * a'_r).
  ar = (r.T[:, None, :] * ap[None]).reshape(k * num_r, -1)       # [K R, i]
  bq = (q.T[:, None, :] * bp[None]).reshape(k * num_r, -1)       # [K R, o]
  left = a.reshape(-1, a.shape[-1]) @ ar.T                        # [B T, K R]
  right = b.reshape(-1, b.shape[-1]) @ bq.T
  out = jnp.sum((left * right).reshape(batch, -1), axis=1)
  if bias_direction is not None:
    out = out + jnp.sum((b.reshape(-1, b.shape[-1]) @ bias_direction.astype(f32))
                        .reshape(batch, -1), axis=1)
  return out


def exact_cost(tokens: int, d_in: int, d_out: int) -> int:
  """Multiply-adds of the exact Dense rule: ``B T d_in d_out``."""
  return tokens * d_in * d_out


# Cost of the ghost rule's per-kernel-element work (the metric's
# factorisation, the factored direction for the add-up check and the
# fallback select), in multiply-add equivalents per element.  These passes
# are memory-bound; measured on the 2-core CPU of docs/bench.md, where an
# MLP with 256- and 1024-wide layers at B = 256 ran slower with the ghost
# rule than with the exact one (see there).
ELEMENT_COST = 256


def ghost_cost(tokens: int, val_tokens: int, d_in: int, d_out: int, rank: int,
               iterations: int = 2, spot_tokens: int = 8) -> int:
  """Multiply-add equivalents of the ghost rule: the pairwise products
  ``B T R K (d_in + d_out)``, the spot check on ``spot_tokens`` tokens
  (``spot_tokens d_in d_out``), the factorisation
  (``(4 iterations + 2) K d_in d_out`` for ``K > 1``) and
  ``ELEMENT_COST d_in d_out`` of elementwise passes over the kernel."""
  factor = (4 * iterations + 2) * rank if rank > 1 else 0
  return (tokens * val_tokens * rank * (d_in + d_out)
          + (spot_tokens + factor + ELEMENT_COST) * d_in * d_out)
