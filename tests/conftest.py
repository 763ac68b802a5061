"""Test-session set-up, done before JAX starts.

- Eight simulated CPU devices for the data-parallel tests.
- A persistent compilation cache private to this pytest run.  The process
  that starts the run (the only one, or pytest-xdist's controller) makes a
  fresh temporary directory and removes it at exit; the xdist workers and the
  subprocesses the tests start (examples, the killed checkpoint writer)
  inherit it through the environment.  Many tests build a new ``jax.jit`` of
  a computation another test (or an earlier call) already compiled; JAX's
  in-memory caches key on the Python function, so without this every such
  step is compiled again.  Keys are the lowered program, the compile options
  and the devices, so a hit is the executable the compiler would have built:
  values are unchanged.  Nothing is kept between runs, so a fresh clone and a
  warm checkout take the same time.  Set ``JAX_COMPILATION_CACHE_DIR``
  yourself to use another directory (then it is not removed), or
  ``OPTAX_SHAPLEY_TEST_CACHE=0`` to compile everything.
"""

import atexit
import os
import re
import shutil
import tempfile

import pytest

if (os.environ.get("OPTAX_SHAPLEY_TEST_CACHE", "1") != "0"
    and "JAX_COMPILATION_CACHE_DIR" not in os.environ):
  _dir = tempfile.mkdtemp(prefix="optax-shapley-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _dir
  atexit.register(shutil.rmtree, _dir, ignore_errors=True)
if "JAX_COMPILATION_CACHE_DIR" in os.environ:
  # Cache every executable, however small or quick to compile (the defaults
  # skip those under 1 s, which is most of this suite's).
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402  (after the environment above)


def _write_cache_entries_atomically():
  """JAX writes a cache entry in place, without a lock (unless a size limit
  is set, whose eviction rescans the whole directory on every write), so a
  process looking up the same key mid-write reads a truncated entry: a
  warning and a recompile.  The xdist workers run the same module-level
  code while collecting, so they do meet.  Entries are written under a
  temporary name and renamed into place instead."""
  try:
    from jax._src import lru_cache
    cls, suffix = lru_cache.LRUCache, lru_cache._CACHE_SUFFIX
  except (ImportError, AttributeError):      # another JAX: leave it be
    return
  original = cls.put

  def put(self, key, value):
    if (not key or getattr(self, "eviction_enabled", True)
        or not getattr(self, "_is_local", False)):
      return original(self, key, value)
    path = self.path / f"{key}{suffix}"
    if path.exists():
      return
    tmp = self.path / f".{key}.{os.getpid()}.tmp"
    tmp.write_bytes(value)
    os.replace(tmp, path)

  cls.put = put


jax.config.update("jax_num_cpu_devices", 8)
if "JAX_COMPILATION_CACHE_DIR" in os.environ:
  _write_cache_entries_atomically()
  jax.config.update("jax_compilation_cache_dir",
                    os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(
      os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", int(
      os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))


# pytest-xdist (`make test` runs `pytest -n 2`): tests are sent to the
# workers one at a time, except these groups, which share an expensive
# module-scoped fixture (or a memoized run) and go to one worker together,
# which computes it once.  (xdist's own `xdist_group` marks are not used: with pytest >= 9.2
# they have no effect, since pytest no longer reads the node id that xdist
# rewrites.)  The groups are listed first, so the long ones start early.
_GROUPED_MODULES = ("tests/test_demo.py", "tests/test_fidelity.py",
                    "tests/test_fidelity_report.py", "tests/test_ghost.py")
_GROUPED_BY_FIXTURE = {"tests/test_models_e2e.py": ("cnn_run",
                                                    "transformer_run")}
# The pmap and shard_map cases of one test share its single-device run.
_GROUPED_ACROSS_MODES = ("tests/test_data_parallel.py",)


def _xdist_scope(nodeid):
  module, _, name = nodeid.partition("::")
  if module in _GROUPED_MODULES:
    return module
  for fixture in _GROUPED_BY_FIXTURE.get(module, ()):
    if fixture in name:
      return f"{module}::{fixture}"
  if module in _GROUPED_ACROSS_MODES:
    return re.sub(r"\[(pmap|shard_map)-?", "[", nodeid)
  return nodeid


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  if config.getvalue("dist") != "load":
    return None                   # another --dist asked for: xdist's own
  from xdist.scheduler import LoadScopeScheduling

  class GroupedLoad(LoadScopeScheduling):
    def _split_scope(self, nodeid):
      return _xdist_scope(nodeid)

  return GroupedLoad(config, log)
