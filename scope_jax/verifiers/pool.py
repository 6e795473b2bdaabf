"""The verifier pool: worker processes that check responses with a hard per-item time limit.

    with Verifier(num_workers=8, timeout_s=5.0) as v:
        results = v.verify_batch(responses, golds)   # list[VerifyResult], input order

Each item goes to the checker its gold asks for: a scope_jax.verifiers.code.CodeTests runs the
program in the sandbox (verify_code), any other gold is a math answer (scope_jax.verifiers.math.
verify). ``InlineVerifier`` is the same interface on the calling thread, without processes.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from typing import Sequence

from scope_jax.verifiers.code import STARTUP_SLACK_S, CodeTests, require_sandbox, verify_code
from scope_jax.verifiers.math import Gold, _tail, verify
from scope_jax.verifiers.result import VerifyResult

log = logging.getLogger(__name__)


def _verify_item(response: str, gold: Gold, timeout_s: float, mode: str) -> VerifyResult:
    if _is_code(gold):  # code: run the program in the sandbox, under the gold's own limits
        return verify_code(response, gold)
    return verify(response, gold, timeout_s=timeout_s, mode=mode)


def _is_code(gold) -> bool:
    """A code task's tests (scope_jax.verifiers.code.CodeTests)."""
    return isinstance(gold, CodeTests)


def _item_timeout_s(gold, timeout_s: float) -> float:
    """The parent's hard limit for one item: timeout_s, or for code the gold's own time limit
    plus the sandbox start-up slack and a margin (the sandbox enforces the real limit)."""
    if not _is_code(gold):
        return timeout_s
    return max(timeout_s, gold.time_limit_s + STARTUP_SLACK_S + 5.0)


def _worker_main(conn, timeout_s: float, memory_limit_mb: int | None, check_fn) -> None:
    """Worker loop: warm up, send "ready", then receive (index, response, gold, mode) and send
    (index, VerifyResult) until told to stop (None) or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if memory_limit_mb:
        import resource

        # A runaway allocation raises MemoryError here instead of swapping the host.
        limit = memory_limit_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # Warm-up (imports, parser tables) happens before "ready", so it never counts against the
    # time limit of a real item.
    _verify_item(r"\boxed{\frac{1}{2}}", "0.5", timeout_s, "boxed")
    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        idx, response, gold, mode = msg
        try:
            res = check_fn(response, gold, timeout_s, mode)
        except BaseException as e:  # MemoryError and the like: report, keep serving
            res = VerifyResult(0.0, "error", None, f"{type(e).__name__}: {e}"[:300])
        conn.send((idx, res))


class _Worker:
    """One worker process, the parent's end of its pipe, and what it is doing."""

    def __init__(self, ctx, timeout_s: float, memory_limit_mb: int | None, check_fn):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main,
                                args=(child, timeout_s, memory_limit_mb, check_fn),
                                daemon=True, name="scope-verifier")
        self.proc.start()
        child.close()
        self.started = time.monotonic()
        self.ready = False  # set when the worker's "ready" message arrives
        self.task: tuple[int, float] | None = None  # (item index, deadline) while busy

    def kill(self) -> None:
        # By pid, not only when is_alive(): once the fork server is gone, is_alive() reads
        # False (exit code 255) for a worker that still runs, which would be left orphaned.
        try:
            os.kill(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, TypeError):
            pass
        self.proc.join(timeout=5)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.proc.join(timeout=2)
        self.kill()


class Verifier:
    """A long-lived pool of verifier worker processes with a hard per-item time limit.

    Usage:
        with Verifier(num_workers=8, timeout_s=5.0) as v:
            results = v.verify_batch(responses, golds)   # list[VerifyResult], input order

    Each worker is a separate process (multiprocessing 'forkserver' by default, with this
    module preloaded in the fork server so a replacement starts in milliseconds) that checks one
    pair at a time. The parent sends an item, and if no result arrives within timeout_s it
    kills the worker (SIGKILL), scores the item VerifyResult(0.0, 'timeout'), and starts a
    replacement. A worker that dies mid-item (a crash; memory beyond memory_limit_mb) scores
    its item 'error' and is replaced. Inside a worker the same limit also runs as a SIGALRM
    timer (slightly shorter), so ordinary slow sympy calls end with 'timeout' without a respawn.
    A worker found dead while idle is replaced and the item it was given is requeued. If the
    fork server itself is lost (killed, OOM), workers are restarted through a new one and the
    items they held are retried once.
    The constructor returns once every worker has started and warmed up.
    """

    def __init__(self, num_workers: int | None = None, timeout_s: float = 5.0, *,
                 mode: str = "boxed", start_method: str = "forkserver",
                 memory_limit_mb: int | None = 4096, startup_timeout_s: float = 120.0,
                 _check_fn=_verify_item):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if mode not in ("boxed", "final_number"):
            raise ValueError(f"mode: expected 'boxed' or 'final_number', got {mode!r}")
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(f"start_method must be 'forkserver' or 'spawn', got {start_method!r}")
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers!r}")
        self.num_workers = num_workers or max(1, os.cpu_count() or 1)
        self.timeout_s = float(timeout_s)
        self.mode = mode
        self.memory_limit_mb = memory_limit_mb
        self.startup_timeout_s = float(startup_timeout_s)
        # Test seam: the per-item function run in the workers (a picklable module-level
        # callable (response, gold, timeout_s, mode) -> VerifyResult); tests inject hangs and
        # crashes with it. Production code leaves it alone.
        self._check_fn = _check_fn
        self._ctx = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            # Takes effect only if the fork server is not running yet; it makes forks cheap.
            # '__main__' (the default preload) imports a script's main module once in the
            # fork server rather than in every worker; as with any spawn/forkserver pool, keep
            # a script's work under `if __name__ == "__main__":`.
            self._ctx.set_forkserver_preload(["__main__", "scope_jax.verifiers.pool", "math_verify"])
        # The worker's own alarm fires a little before the parent's kill, for a clean result.
        self._inner_timeout = max(0.05, 0.9 * self.timeout_s)
        self.restarts = 0  # workers killed or found dead, and replaced
        self._lock = threading.Lock()
        self._workers: list[_Worker] | None = [self._new_worker() for _ in range(self.num_workers)]
        try:
            self._run([], [], [])  # returns once every worker is ready
        except BaseException:
            self.close()
            raise

    def _new_worker(self, attempts: int = 5) -> _Worker:
        for attempt in range(attempts):
            try:
                return _Worker(self._ctx, self._inner_timeout, self.memory_limit_mb, self._check_fn)
            except (EOFError, ConnectionError, FileNotFoundError) as e:
                # The fork server died (killed, OOM); multiprocessing starts a new one on a later
                # request, but only once it sees the old one gone (a killed server that is not
                # reaped yet still looks alive, and its socket refuses): wait a little, retry.
                if attempt == attempts - 1:
                    raise
                log.warning("verifier fork server lost while starting a worker (%s: %s); restarting it",
                            type(e).__name__, e)
                time.sleep(0.1 * (attempt + 1))

    def _lost_fork_server(self, w: _Worker) -> bool:
        """True when `w` looks dead because the fork server is gone: multiprocessing then reads
        exit code 255 (it cannot read the real status), and the worker may even still run."""
        return self._ctx.get_start_method() == "forkserver" and w.proc.exitcode == 255

    def _replace(self, i: int) -> None:
        self._workers[i].kill()
        self._workers[i] = self._new_worker()
        self.restarts += 1

    def verify_batch(self, responses: Sequence[str], golds: Sequence[Gold]) -> list[VerifyResult]:
        """Check responses[i] against golds[i] for every i; results in input order.

        Args:
          responses: N model outputs (str; only the last MAX_RESPONSE_CHARS are sent).
          golds: N gold answers, each as accepted by verify(), or a
            scope_jax.verifiers.code.CodeTests (checked by verify_code in the sandbox, under
            its own time limit rather than timeout_s).
        Returns:
          N VerifyResults. No item holds a worker longer than timeout_s; the batch's wall time
          is about sum(item times) / num_workers plus worker restarts (milliseconds each).
        """
        if self._workers is None:
            raise RuntimeError("Verifier is closed")
        if len(responses) != len(golds):
            raise ValueError(f"verify_batch: {len(responses)} responses but {len(golds)} golds")
        if any(_is_code(g) for g in golds):
            require_sandbox()  # SandboxUnavailable names the problem; never run unsandboxed
        results: list[VerifyResult | None] = [None] * len(responses)
        with self._lock:  # callable from any thread; concurrent batches take turns
            if self._workers is None:
                raise RuntimeError("Verifier is closed")
            self._run(responses, golds, results)
        return results  # type: ignore[return-value]

    def _run(self, responses, golds, results) -> None:
        """Scheduling loop: feed ready workers, collect results, enforce deadlines, replace
        dead or overdue workers. Returns when every item has a result and every worker is
        ready (so the next batch starts on warm workers)."""
        queue = collections.deque(range(len(responses)))
        retried: set[int] = set()
        while True:
            workers = self._workers
            for i, w in enumerate(workers):
                if w.ready and w.task is None and queue:
                    idx = queue.popleft()
                    resp = responses[idx]
                    msg = (idx, _tail(resp) if isinstance(resp, str) else resp, golds[idx], self.mode)
                    try:
                        w.conn.send(msg)
                        w.task = (idx, time.monotonic()
                                  + _item_timeout_s(golds[idx], self.timeout_s))
                    except (OSError, ValueError):
                        # The worker died while idle; the item never reached it: requeue it
                        # (each failure replaces a worker, so this ends).
                        self._replace(i)
                        queue.appendleft(idx)
            workers = self._workers
            if not queue and all(w.ready and w.task is None for w in workers):
                return
            now = time.monotonic()
            deadlines = [w.task[1] for w in workers if w.task is not None]
            deadlines += [w.started + self.startup_timeout_s for w in workers if not w.ready]
            handles = [h for w in workers if not (w.ready and w.task is None)
                       for h in (w.conn, w.proc.sentinel)]
            ready = set(multiprocessing.connection.wait(handles, timeout=max(0.0, min(deadlines) - now)))
            now = time.monotonic()
            for i, w in enumerate(workers):
                if w.ready and w.task is None:
                    continue
                if w.conn in ready or w.proc.sentinel in ready:
                    try:
                        if w.conn.poll():
                            msg = w.conn.recv()
                            if msg == "ready":
                                w.ready = True
                                continue
                            got_idx, res = msg
                            if w.task is None or got_idx != w.task[0]:
                                raise RuntimeError(f"verifier worker answered item {got_idx} "
                                                   f"while working on {w.task}")
                            results[got_idx] = res
                            w.task = None
                            continue
                    except (EOFError, OSError):
                        pass  # died after writing part of a message: handled as dead below
                    if not w.proc.is_alive():
                        code = w.proc.exitcode
                        if w.task is None:  # died while starting
                            raise RuntimeError(
                                f"verifier worker failed to start (exit code {code}); its "
                                "traceback is on stderr. Workers are started with forkserver, "
                                "which re-imports the calling script: a script that starts "
                                "training or a Verifier at import time needs an "
                                "`if __name__ == '__main__':` guard")
                        idx = w.task[0]
                        w.task = None
                        lost_server = self._lost_fork_server(w)
                        self._replace(i)
                        if lost_server and idx not in retried:
                            # Not the item's fault: the fork server went (and took the worker,
                            # or its status). A new one starts with the replacement; retry once.
                            log.warning("verifier fork server lost; item %d retried on a new worker", idx)
                            retried.add(idx)
                            queue.appendleft(idx)
                        else:
                            results[idx] = VerifyResult(
                                0.0, "error", None, f"verifier worker died (exit code {code})")
                        continue
                if w.task is not None and now >= w.task[1]:
                    idx = w.task[0]
                    w.task = None
                    self._replace(i)
                    results[idx] = VerifyResult(
                        0.0, "timeout", None,
                        f"no result within {self.timeout_s} s; worker killed and replaced")
                elif not w.ready and now >= w.started + self.startup_timeout_s:
                    raise RuntimeError(f"verifier worker not ready after {self.startup_timeout_s} s")

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (for monitoring and tests)."""
        if self._workers is None:
            return []
        return [w.proc.pid for w in self._workers]

    def close(self) -> None:
        """Stop all workers. Idempotent."""
        if getattr(self, "_workers", None) is None:
            return
        with self._lock:
            workers, self._workers = self._workers, None
        for w in workers:
            w.stop()

    def __enter__(self) -> "Verifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def verify_batch(responses: Sequence[str], golds: Sequence[Gold], *, timeout_s: float = 5.0,
                 num_workers: int | None = None, mode: str = "boxed") -> list[VerifyResult]:
    """One-off batch check through a temporary Verifier pool (pays process start-up on each
    call; a trainer should keep a Verifier open instead). See Verifier.verify_batch."""
    with Verifier(num_workers=num_workers, timeout_s=timeout_s, mode=mode) as v:
        return v.verify_batch(responses, golds)


class InlineVerifier:
    """Verifier's interface run on the calling thread, without worker processes: verify() of
    each pair in turn (math answers only; its SIGALRM time limit needs the main thread). For
    callers that check a few hundred answers from the main thread (the toy build, tools)."""

    def __init__(self, timeout_s: float = 5.0, mode: str = "boxed"):
        self.timeout_s, self.mode = float(timeout_s), mode

    def verify_batch(self, responses: Sequence[str], golds: Sequence[Gold]) -> list[VerifyResult]:
        if len(responses) != len(golds):
            raise ValueError(f"verify_batch: {len(responses)} responses but {len(golds)} golds")
        return [verify(r, g, timeout_s=self.timeout_s, mode=self.mode) for r, g in zip(responses, golds)]

    def close(self) -> None:
        pass
