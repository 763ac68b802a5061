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
import shutil
import tempfile

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

jax.config.update("jax_num_cpu_devices", 8)
if "JAX_COMPILATION_CACHE_DIR" in os.environ:
  jax.config.update("jax_compilation_cache_dir",
                    os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(
      os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", int(
      os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))

