"""Test-wide setup: 8 fake CPU devices so sharding is exercised on any machine.

XLA_FLAGS and PJRT_NPROC must be set before jax creates its CPU client, which is why this
lives in conftest (subprocesses started with os.environ inherit both).
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

# XLA:CPU runs a device's independent thunks on the client's intra-op pool, which PJRT sizes to
# the cores (2 on CI), and a collective blocks its pool thread until every participant arrives.
# With 8 fake devices the last participant can wait, queued behind blocked ones, until XLA aborts
# the process ("Termination timeout ... of 40 seconds exceeded ... only 7 of them arrived").
# Measured on tests/test_packing.py's micro-batched step (2026-12-05, 2-core VM, two CPU hogs
# beside it): 3 of 21 runs aborted with the default pool, 3 of 6 with PJRT_NPROC=1, 0 of 10 with
# 16; 32 threads cost no measurable time (17.1-17.7 s against 17.3-17.5 s, no hogs).
os.environ.setdefault("PJRT_NPROC", "32")

# A tools.train run in a subprocess spends most of its time compiling the tiny models' steps,
# which other tests compiled before. JAX's persistent compilation cache, shared by the xdist
# workers and every subprocess (they inherit os.environ), serves them from disk: 33-39 s -> 13 s
# per 2-step CLI run (2026-12-07, 2-core dev machine, beside a study, warm cache; with the
# settings below, 15 s -> 11 s: test_cli_trains_every_algorithm[scope], idle). A fresh clone's
# cold cache serves a test's repeated runs: test_corrupt_checkpoints_are_moved_aside... 213 s ->
# 124 s (2026-12-07, same machine and load, `pytest -p no:xdist` on that test with
# JAX_ENABLE_COMPILATION_CACHE=false, then with an empty cache directory). The cache key is the
# compiled HLO, options, devices and jax version, so a changed program compiles afresh; cost and
# memory analyses of a cached executable are the compiled one's. A size limit turns on JAX's file
# lock, so no process reads another's half-written entry, but then every write scans the whole
# directory for eviction (jax/_src/lru_cache.py: a stat and an atime read per entry, under the
# lock): 0.22 s per write at the 3,878 entries a cold suite wrote, most of them op-by-op
# primitives compiled in tens of milliseconds. So only programs that took 0.1 s or more to
# compile are written: a cold suite then writes 658 entries, and its pytest time fell from 1,403 s
# to 1,060 s (2026-12-07, 2-core dev machine, `pytest -n 2 --dist loadfile` from an empty cache
# directory, both with the optimisations below off). Set JAX_COMPILATION_CACHE_DIR to override;
# the directory is .pytest_cache/jax (ignored by git, kept between local runs).

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, ".pytest_cache", "jax"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# Compiling is most of a cold test run (tests/test_sampling.py: 157 s of 196 s in XLA compilation
# and the cache reads and writes around it, 612 programs), and the tests check what the programs
# compute, not how fast they run. So XLA skips its most expensive optimisations (LLVM at -O0, no
# expensive passes), which leaves the HLO as the default compile makes it: test_scale's
# micro-batched step on 8 devices has the same optimised HLO text, memory analysis, FLOPs and
# collectives either way (2026-12-07); only the machine code is less tuned. A cold suite's pytest
# time: 1,767-1,882 s at the default level (two fresh-clone CI runs that day), 1,403 s with this.
# The benchmarks under tools/ and `make demo` compile at the default level. Set
# JAX_DISABLE_MOST_OPTIMIZATIONS=0 to run the tests at the default level.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")


import sys  # noqa: E402  (after the environment above, which must precede any jax import)

import pytest  # noqa: E402


@pytest.fixture
def python_lines():
    """count(fn, *args): the Python lines the call executes (sys.settrace line events, every
    frame it enters). A deterministic measure of work for complexity tests: wall time on a
    shared 2-core CI machine is not one (a 20 ms call once took over 1 s there under load).
    It sees Python-level loops (a rescan per line, a nested loop), not work inside C calls."""
    def count(fn, *args):
        lines = 0

        def tracer(frame, event, arg):
            nonlocal lines
            lines += event == "line"
            return tracer

        previous = sys.gettrace()
        sys.settrace(tracer)
        try:
            fn(*args)
        finally:
            sys.settrace(previous)
        return lines
    return count
