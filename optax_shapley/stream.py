"""Streaming step values to host storage: values for any number of examples.

With ``with_shapley(..., table="none")`` the state keeps no ``N``-sized
table; each step's values (``oxs.step_values(state)``) go to a
:class:`ValueWriter`, which copies them to the host and writes them to
``.npz`` files in a background thread, so the training loop does not wait.
:func:`reduce_values` sums them per example afterwards.

Records are keyed by step: a step written twice (a run resumed from a
checkpoint taken before steps it had already streamed) counts once, with
the copy written last, so resuming is idempotent.

Example::

  writer = oxs.ValueWriter("runs/values")
  for t, (x, y, ids) in enumerate(batches):
    params, state = step(params, state, x, y, ids)
    writer.write(t, ids, oxs.step_values(state))
  writer.close()
  ids, values = oxs.reduce_values("runs/values")     # the examples seen
"""

from __future__ import annotations

import glob
import os
import queue
import threading
from typing import Any

import jax
import numpy as np

__all__ = ["ValueWriter", "reduce_values"]

_PATTERN = "values-{seq:06d}-{first:012d}-{last:012d}.npz"


class ValueWriter:
  """Writes ``(step, example_ids, step_values)`` records to ``directory``.

  Records are buffered and written every ``steps_per_file`` steps (and on
  :meth:`flush` / :meth:`close`) as ``values-<seq>-<first>-<last>.npz`` with
  arrays ``steps`` i64[R], ``ids`` i64[R, B] and ``values`` f32[R, B, ...]
  (``R`` records; ``B`` and the trailing axes fixed per file).  Device
  arrays are copied to the host by the writer thread, not the caller.
  Files are written to a temporary name and renamed, so a killed process
  leaves only whole files.

  Args:
    directory: created if missing; files of an earlier run are kept (and
      new ones numbered after them), so a resumed run appends.
    steps_per_file: records per file.
    max_pending: records queued before :meth:`write` blocks (bounds host
      memory if the disk is slower than training).

  Raises:
    ValueError: ``steps_per_file < 1``.  Errors of the writer thread are
      raised by the next :meth:`write`, :meth:`flush` or :meth:`close`.

  Example:
    Two steps of a batch of two; example 1 takes part in both:

    >>> import tempfile
    >>> import numpy as np
    >>> import optax_shapley as oxs
    >>> tmp = tempfile.TemporaryDirectory()
    >>> with oxs.ValueWriter(tmp.name) as writer:
    ...   writer.write(0, np.array([3, 1]), np.array([0.5, -1.0]))
    ...   writer.write(1, np.array([1, 2]), np.array([2.0, 0.25]))
    >>> ids, values = oxs.reduce_values(tmp.name)
    >>> print(ids, values)
    [1 2 3] [1.   0.25 0.5 ]

    A resumed run that streams step 1 again counts it once, with the copy
    written last:

    >>> with oxs.ValueWriter(tmp.name) as writer:
    ...   writer.write(1, np.array([1, 2]), np.array([4.0, 0.25]))
    >>> print(oxs.reduce_values(tmp.name, num_examples=5))
    [0.   3.   0.25 0.5  0.  ]
    >>> tmp.cleanup()
  """

  def __init__(self, directory: str, steps_per_file: int = 1000,
               max_pending: int = 10000):
    if steps_per_file < 1:
      raise ValueError(f"steps_per_file must be >= 1, got {steps_per_file}")
    self.directory = directory
    os.makedirs(directory, exist_ok=True)
    self._seq = 1 + max((_seq(f) for f in _files(directory)), default=-1)
    self._per_file = steps_per_file
    self._buffer: list[tuple[int, Any, Any]] = []
    self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
    self._error: BaseException | None = None
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def write(self, step: int, example_ids, values) -> None:
    """Queues one step's record; ``example_ids`` int[B], ``values`` f[B, ...]
    (device or host arrays, aligned as ``oxs.step_values`` is)."""
    self._raise()
    self._queue.put(("record", int(step), example_ids, values))

  def flush(self) -> None:
    """Writes everything queued so far to disk and waits for it."""
    self._raise()
    done = threading.Event()
    self._queue.put(("flush", done))
    done.wait()
    self._raise()

  def close(self) -> None:
    """Flushes and stops the writer thread."""
    if self._thread.is_alive():
      self.flush()
      self._queue.put(("stop",))
      self._thread.join()
    self._raise()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _raise(self):
    if self._error is not None:
      raise RuntimeError(f"ValueWriter failed: {self._error!r}") from self._error

  def _run(self):
    while True:
      item = self._queue.get()
      try:
        if item[0] == "record":
          _, step, ids, vals = item
          ids, vals = jax.device_get((ids, vals))
          self._buffer.append((step, np.asarray(ids, np.int64),
                               np.asarray(vals, np.float32)))
          if len(self._buffer) >= self._per_file:
            self._write_file()
        elif item[0] == "flush":
          self._write_file()
          item[1].set()
        else:
          return
      except BaseException as e:  # pylint: disable=broad-except
        self._error = e
        if item[0] == "flush":
          item[1].set()

  def _write_file(self):
    if not self._buffer:
      return
    steps = np.array([s for s, _, _ in self._buffer], np.int64)
    name = _PATTERN.format(seq=self._seq, first=int(steps.min()),
                           last=int(steps.max()))
    path = os.path.join(self.directory, name)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
      np.savez(f, steps=steps, ids=np.stack([i for _, i, _ in self._buffer]),
               values=np.stack([v for _, _, v in self._buffer]))
    os.replace(tmp, path)
    self._seq += 1
    self._buffer = []


def _files(directory):
  return sorted(glob.glob(os.path.join(directory, "values-*.npz")))


def _seq(path):
  return int(os.path.basename(path).split("-")[1])


def reduce_values(directory: str, num_examples: int | None = None):
  """Sums the streamed step values per example.

  Each step counts once: when a step appears in several files (a resumed
  run), the file written last wins.

  Args:
    directory: the :class:`ValueWriter`'s directory.
    num_examples: if given, return a dense ``f64[num_examples, ...]`` table
      (zeros for examples never seen); otherwise only the examples seen.

  Returns:
    ``(ids i64[M], values f64[M, ...])`` sorted by id, or the dense table.

  Raises:
    FileNotFoundError: no value files in ``directory``.
    ValueError: an id outside ``[0, num_examples)``.

  Example:
    Values of several estimators (``f[B, E]`` per step) keep their
    trailing axis:

    >>> import tempfile
    >>> import numpy as np
    >>> import optax_shapley as oxs
    >>> tmp = tempfile.TemporaryDirectory()
    >>> with oxs.ValueWriter(tmp.name) as writer:
    ...   writer.write(0, np.array([0, 2]), np.array([[1.0, 2.0], [3.0, 4.0]]))
    ...   writer.write(1, np.array([2, 1]), np.array([[0.5, 0.5], [1.0, 1.0]]))
    >>> ids, values = oxs.reduce_values(tmp.name)
    >>> print(ids)
    [0 1 2]
    >>> print(values)
    [[1.  2. ]
     [1.  1. ]
     [3.5 4.5]]
    >>> oxs.reduce_values(tmp.name, num_examples=4).shape
    (4, 2)
    >>> tmp.cleanup()
  """
  files = _files(directory)
  if not files:
    raise FileNotFoundError(f"no value files in {directory!r}")
  latest: dict[int, tuple[int, int]] = {}    # step -> (file index, row)
  loaded = []
  for k, path in enumerate(sorted(files, key=_seq)):
    with np.load(path) as z:
      loaded.append((z["steps"], z["ids"], z["values"]))
    for row, step in enumerate(loaded[-1][0]):
      latest[int(step)] = (k, row)
  picks: dict[int, list[int]] = {}
  for k, row in latest.values():
    picks.setdefault(k, []).append(row)
  ids = np.concatenate([loaded[k][1][rows].reshape(-1)
                        for k, rows in picks.items()])
  vals = np.concatenate([
      loaded[k][2][rows].reshape((-1,) + loaded[k][2].shape[2:])
      for k, rows in picks.items()]).astype(np.float64)
  if num_examples is not None:
    bad = ids[(ids < 0) | (ids >= num_examples)]
    if bad.size:
      raise ValueError(f"example id {int(bad[0])} out of range "
                       f"[0, {num_examples})")
    table = np.zeros((num_examples,) + vals.shape[1:])
    np.add.at(table, ids, vals)
    return table
  uniq, inverse = np.unique(ids, return_inverse=True)
  sums = np.zeros((len(uniq),) + vals.shape[1:])
  np.add.at(sums, inverse, vals)
  return uniq, sums
