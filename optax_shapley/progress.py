"""Progress of long attribution jobs: a bar on a terminal, log lines otherwise.

Example::

  bar = oxs.Progress(total=steps, batch_size=B)
  for t in range(steps):
    params, state = step(params, state, *batch(t))
    bar.update(state)          # throughput and the running mean of values
  bar.close()

On an interactive terminal this is a ``tqdm`` bar whose postfix shows
examples per second and the mean of the values credited so far; in a
non-interactive run (a batch job, a pipe) it logs one line every
``log_every`` steps through :mod:`logging` (logger ``"optax_shapley"``),
so job logs stay readable.
"""

from __future__ import annotations

import logging
import sys
import time

import numpy as np

from optax_shapley import transform

__all__ = ["Progress"]

logger = logging.getLogger("optax_shapley")


class Progress:
  """Steps, throughput and the running mean of step values.

  Args:
    total: steps expected (for the bar and the ETA); ``None`` if unknown.
    batch_size: examples per step (global), for examples per second.
    log_every: steps between log lines in non-interactive mode.
    interactive: force the bar (``True``) or log lines (``False``);
      default: whether stderr is a terminal.
    enabled: ``False`` silences it (e.g. on every process but the first of
      a multi-host job: ``enabled=jax.process_index() == 0``).
    desc: label.

  The running mean is over all step values seen by :meth:`update` (every
  estimator and target pooled); reading them synchronises with the device,
  so it is sampled only when a line or the bar's postfix is refreshed.

  Example:
    Without a terminal (``interactive=False``, as in a batch job) it logs
    through the ``"optax_shapley"`` logger; here its lines go to stdout.
    The state of a freshly initialised transformation has zero step values:

    >>> import logging, sys
    >>> import jax.numpy as jnp
    >>> import optax_shapley as oxs
    >>> log = logging.getLogger("optax_shapley")
    >>> handler = logging.StreamHandler(sys.stdout)
    >>> log.addHandler(handler); log.setLevel(logging.INFO)
    >>> tx = oxs.sgd(0.1, num_examples=8, batch_size=2)
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> with oxs.Progress(total=4, batch_size=2, log_every=2,
    ...                   interactive=False) as bar:
    ...   for t in range(4):
    ...     bar.update(state)  # doctest: +ELLIPSIS
    attribution: step 2/4, ... steps/s, ... examples/s, mean value +0.000e+00
    attribution: step 4/4, ... steps/s, ... examples/s, mean value +0.000e+00
    >>> log.removeHandler(handler); log.setLevel(logging.NOTSET)
  """

  def __init__(self, total: int | None = None, batch_size: int | None = None,
               log_every: int = 100, interactive: bool | None = None,
               enabled: bool = True, desc: str = "attribution"):
    self.total, self.batch_size, self.log_every = total, batch_size, log_every
    self.enabled = enabled
    self.steps = 0
    self._sum, self._count = 0.0, 0
    # The rate is timed from the first update on: the first call of a
    # jitted step includes its compilation, and a resumed run may set steps.
    self._start, self._start_steps = None, 0
    self._last_refresh = 0.0
    if interactive is None:
      interactive = sys.stderr.isatty()
    self._bar = None
    if enabled and interactive:
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total, desc=desc, unit="step")
    self.desc = desc

  def update(self, state=None, steps: int = 1) -> None:
    """Counts ``steps`` steps; ``state``: the optimizer state after them."""
    if not self.enabled:
      return
    self.steps += steps
    due_log = self._bar is None and (self.steps % self.log_every == 0
                                     or self.steps == self.total)
    now = time.perf_counter()
    if self._start is None:
      self._start, self._start_steps = now, self.steps
    due_bar = self._bar is not None and now - self._last_refresh > 0.5
    if state is not None and (due_log or due_bar):
      vals = np.asarray(transform.step_values(state), np.float64)
      finite = vals[np.isfinite(vals)]
      self._sum += float(finite.sum())
      self._count += finite.size
    if self._bar is not None:
      self._bar.update(steps)
      if due_bar:
        self._last_refresh = now
        self._bar.set_postfix_str(self._postfix(now))
    elif due_log:
      logger.info("%s: step %d%s, %s", self.desc, self.steps,
                  f"/{self.total}" if self.total else "", self._postfix(now))

  def _postfix(self, now: float) -> str:
    parts = []
    if self.steps > self._start_steps:
      rate = (self.steps - self._start_steps) / max(now - self._start, 1e-9)
      parts.append(f"{rate:.1f} steps/s")
      if self.batch_size:
        parts.append(f"{rate * self.batch_size:.0f} examples/s")
    if self._count:
      parts.append(f"mean value {self._sum / self._count:+.3e}")
    return ", ".join(parts) or "first step"

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
