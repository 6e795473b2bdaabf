"""Code answer checking: run the response's program against the task's tests in a sandbox.

A task's tests are a ``CodeTests``: either function tests (HumanEval's ``check(candidate)`` with
an entry point and the problem prompt) or stdin/stdout pairs (TACO, Codeforces). A gold that is
a ``CodeTests`` makes ``scope_jax.verifiers.pool.Verifier.verify_batch`` (the one verifier pool)
route the item here; the worker process calls ``verify_code(response, tests)``.

The program is untrusted. It runs only inside bubblewrap (``bwrap``, Debian package
``bubblewrap``), never in this process and never unsandboxed:

* fresh user, PID, network, IPC, UTS and cgroup namespaces (``--unshare-all``): no network, no
  view of other processes; ``--die-with-parent``, ``--new-session``, and ``--as-pid-1`` (the
  checker is PID 1, so no bwrap reaper holds its pipes);
* a read-only view of /usr (and /lib*, /bin, /sbin links), /etc/ld.so.cache, and the Python
  installation when it lives outside /usr; a private /proc, a read-only /dev, and two
  size-limited tmpfs, /tmp (64 MB) and /dev/shm (16 MB), the only writable places. The
  project, the working directory, /work, /root and the home directory are not mounted at all;
* when the verifier runs as root, the sandbox runs as the user ``nobody`` (as root no capability
  would be dropped and RLIMIT_NPROC would not apply);
* per program run: RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_NPROC (counted per user namespace,
  so it contains a fork bomb), RLIMIT_FSIZE, RLIMIT_NOFILE, no core files, a wall-clock limit,
  output read up to a byte limit, and the whole process group killed at any limit.

Inside, ``code_harness`` (stdlib only) checks the program from a separate process; see its
docstring for why a program cannot fake a pass (no shared memory with the checker, results as
literals, a per-run token printed only after the checks and only after every process of the
program is dead).

A machine that cannot run the sandbox (no bwrap, user namespaces disabled) gets
``SandboxUnavailable`` naming the problem, from ``require_sandbox()`` (called by
``Verifier.verify_batch`` before any code item runs). Environment: SCOPE_BWRAP (the bwrap
binary), SCOPE_SANDBOX_PYTHON (the interpreter used inside; default /usr/bin/python3, else the
base interpreter of sys.executable).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Sequence

from scope_jax.verifiers import code_harness
from scope_jax.verifiers.result import VerifyResult

REASONS = ("pass", "fail", "timeout", "memory", "syntax", "no_code", "sandbox_error")

# Start-up of bwrap and two interpreters on a loaded machine, on top of a task's time limit,
# before the outer kill. The harness enforces time_limit_s itself; this is the backstop.
STARTUP_SLACK_S = 5.0
_HARNESS_SRC = pathlib.Path(code_harness.__file__).read_text()


class SandboxUnavailable(RuntimeError):
    """This machine cannot run the code sandbox; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class CodeTests:
    """The tests of one code task (picklable; travels to the verifier workers as a gold).

    Function tests (``test`` non-empty): ``test`` is Python source defining ``check(candidate)``
      (HumanEval); ``entry_point`` the function the program must define (or a method of a
      ``class Solution``); ``prompt`` Python source run before the program (the HumanEval
      prompt: imports, helpers and the stub the completion continues) and before the test (its
      helpers, e.g. ``encode_cyclic``, are available to ``check``).
    Stdin/stdout tests (``test`` empty): ``inputs[i]`` is fed to a fresh run of the program,
      whose stdout must match ``outputs[i]`` (whitespace-insensitive, numbers within 1e-6).
    Limits: time_limit_s is the wall-clock budget of the whole item (all calls or all cases;
      also the CPU limit of each run); memory_limit_mb the address-space limit of each run;
      max_processes the processes (threads included) the program may have at once, counted
      with the sandbox's own two (each may use memory_limit_mb: RLIMIT_AS is per process, and
      a cgroup, which would bound the sum, needs privileges); max_output_bytes the stdout
      read from each run (stdio: at least twice the expected output).
    """

    test: str = ""
    entry_point: str = ""
    prompt: str = ""
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    task_id: str = ""
    time_limit_s: float = 5.0
    memory_limit_mb: int = 1024
    max_processes: int = 8
    max_output_bytes: int = 1 << 20

    def __post_init__(self):
        where = f"CodeTests {self.task_id!r}" if self.task_id else "CodeTests"
        if self.test:
            if not re.fullmatch(r"[A-Za-z_]\w*", self.entry_point or ""):
                raise ValueError(f"{where}: function tests need an entry_point identifier, got "
                                 f"{self.entry_point!r}")
            if self.inputs or self.outputs:
                raise ValueError(f"{where}: give either test (function tests) or inputs/outputs "
                                 "(stdin/stdout tests), not both")
        else:
            if not self.inputs or len(self.inputs) != len(self.outputs):
                raise ValueError(f"{where}: stdin/stdout tests need equally many inputs and "
                                 f"outputs (>= 1), got {len(self.inputs)} and {len(self.outputs)}")
            if not all(isinstance(x, str) for x in self.inputs + self.outputs):
                raise ValueError(f"{where}: inputs and outputs must be strings")
        if not self.time_limit_s > 0 or self.memory_limit_mb < 64 or self.max_processes < 3:
            raise ValueError(f"{where}: limits out of range (time_limit_s > 0, memory_limit_mb "
                             ">= 64, max_processes >= 3)")

    @property
    def kind(self) -> str:
        """'function' or 'stdio'."""
        return "function" if self.test else "stdio"

    def __str__(self) -> str:  # what evaluation records store as the gold
        what = (f"function tests of {self.entry_point}" if self.test
                else f"{len(self.inputs)} stdin/stdout cases")
        return f"{self.task_id or 'code task'}: {what}"

    @classmethod
    def from_humaneval(cls, problem: dict, **limits) -> "CodeTests":
        """From a HumanEval row (task_id, prompt, test, entry_point); limits as the fields."""
        missing = [k for k in ("task_id", "prompt", "test", "entry_point") if k not in problem]
        if missing:
            raise ValueError(f"HumanEval problem {problem.get('task_id', '?')}: missing {missing}")
        return cls(test=problem["test"], entry_point=problem["entry_point"],
                   prompt=problem["prompt"], task_id=problem["task_id"], **limits)

    @classmethod
    def from_calls(cls, fn_name: str, inputs: Sequence[Any], outputs: Sequence[Any], *,
                   task_id: str = "", **limits) -> "CodeTests":
        """Function tests from argument lists and expected return values (TACO ``fn_name``
        rows): case i passes when fn(*inputs[i]) == outputs[i], or == outputs[i][0] when that
        is a one-element list (TACO wraps return values so), tuples compared as lists."""
        if len(inputs) != len(outputs) or not inputs:
            raise ValueError(f"CodeTests {task_id!r}: {len(inputs)} inputs but {len(outputs)} "
                             "outputs (need equally many, >= 1)")
        cases = json.dumps([[list(a) if isinstance(a, (list, tuple)) else [a], o]
                            for a, o in zip(inputs, outputs)])
        test = _CALLS_CHECK.format(cases=repr(cases))
        return cls(test=test, entry_point=fn_name, prompt=_CALLS_PRELUDE, task_id=task_id,
                   **limits)


# Imports that LeetCode / Codewars style solutions assume (as the APPS / TACO harness adds).
_CALLS_PRELUDE = ("import bisect, collections, functools, heapq, itertools, math, re, string, sys\n"
                  "from typing import *\n")
_CALLS_CHECK = '''
import json


def _plain(v):
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {{k: _plain(x) for k, x in v.items()}}
    return v


def check(candidate):
    for i, (args, expected) in enumerate(json.loads({cases})):
        got = _plain(candidate(*args))
        ok = got == expected or (isinstance(expected, list) and len(expected) == 1
                                 and got == expected[0])
        assert ok, "case %d" % (i + 1)
'''


# ----------------------------------------------------------------------------- extraction

_PYTHON_TAGS = ("python", "py", "python3")


def extract_code(response: str) -> str | None:
    """The program in a response: the last ```python (or ```py / ```python3) fenced block;
    else the last untagged ``` block; else the raw text (completion style). Lines keep their
    indentation (a completion's body stays indented) less that of an indented fence. A fence
    left open at the end (a truncated response) still counts as a block. Blocks in other
    languages are skipped. One pass over the lines (linear time). Returns None when nothing but
    whitespace remains."""
    if not isinstance(response, str):
        raise TypeError(f"response: expected str, got {type(response).__name__}")
    blocks: list[tuple[str, list[str]]] = []
    current: tuple[str, list[str]] | None = None
    indent = ""
    for line in response.splitlines(keepends=True):
        s = line.strip()
        if current is None:
            if s.startswith("```"):
                current = (s[3:].strip().lower(), [])
                indent = line[:len(line) - len(line.lstrip())]
        elif s.startswith("```") and not s.strip("`"):
            blocks.append(current)
            current = None
        else:
            # A fence indented in a list indents its lines too; a function body keeps its own.
            current[1].append(line[len(indent):] if line.startswith(indent) else line)
    if current is not None:
        blocks.append(current)
    tagged = [b for b in blocks if b[0] in _PYTHON_TAGS]
    plain = [b for b in blocks if b[0] == ""]
    if tagged or plain:
        code = "".join((tagged or plain)[-1][1])
    else:
        code = response
    return code if code.strip() else None


def program_for(code: str, tests: CodeTests) -> str:
    """The program that runs: for function tests the prompt, then the code. A completion
    (code that does not define the entry point) continues the prompt's stub, HumanEval style;
    a full definition replaces the stub and may use the prompt's imports and helpers."""
    if not tests.test or not tests.prompt:
        return code
    sep = "" if tests.prompt.endswith("\n") else "\n"
    return tests.prompt + sep + code


# ----------------------------------------------------------------------------- sandbox


@dataclasses.dataclass(frozen=True)
class _Sandbox:
    argv: tuple[str, ...]  # bwrap ... -- python -I -S -c
    popen_kwargs: dict


def _python_inside() -> tuple[str, str | None]:
    """(interpreter, prefix to bind or None when /usr already holds it)."""
    python = os.environ.get("SCOPE_SANDBOX_PYTHON")
    if not python:
        python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else \
            os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    real = os.path.realpath(python)
    if real.startswith("/usr/"):
        return python, None
    prefix = os.path.dirname(os.path.dirname(real))  # <prefix>/bin/python3.X
    repo = str(pathlib.Path(__file__).resolve().parents[2])
    if prefix in ("/", os.path.expanduser("~")) or repo.startswith(prefix + os.sep):
        raise SandboxUnavailable(
            f"the sandbox interpreter {real} lives in {prefix}, which would expose the project "
            "or the home directory; install python3 under /usr or set SCOPE_SANDBOX_PYTHON")
    return python, prefix


@functools.lru_cache(maxsize=None)
def _sandbox() -> _Sandbox:
    bwrap = os.environ.get("SCOPE_BWRAP") or shutil.which("bwrap") or (
        "/usr/bin/bwrap" if os.access("/usr/bin/bwrap", os.X_OK) else None)
    if bwrap is None:
        raise SandboxUnavailable(
            "bubblewrap (bwrap) is not installed; code verification runs programs only inside "
            "it. Install it: `sudo apt-get install -y bubblewrap` (or set SCOPE_BWRAP)")
    python, prefix = _python_inside()
    # --as-pid-1: the harness itself is PID 1 of the sandbox. bwrap's own reaper would be a
    # dumpable process holding the harness's stdin (the token) and stdout (the verdict), which
    # the program could ptrace; and as PID 1 the harness cannot be killed from inside.
    argv = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--as-pid-1",
            "--cap-drop", "ALL", "--ro-bind", "/usr", "/usr"]
    for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d):
            argv += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            argv += ["--ro-bind", d, d]
    argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    if prefix is not None:
        argv += ["--ro-bind", prefix, prefix]
    # Every writable place is a size-limited tmpfs (its pages are host memory): /tmp and
    # /dev/shm; /dev itself (a tmpfs of device nodes) and / are read-only.
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(64 << 20), "--tmpfs", "/tmp",
             "--size", str(16 << 20), "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
             "--remount-ro", "/", "--chdir", "/tmp", "--",
             python, "-I", "-S", "-c", _HARNESS_SRC]
    kwargs: dict = {"env": {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp"},
                    "cwd": "/"}
    if os.geteuid() == 0:
        # Root keeps capabilities inside the user namespace and is exempt from RLIMIT_NPROC.
        import pwd

        try:
            nobody = pwd.getpwnam("nobody")
            uid, gid = nobody.pw_uid, nobody.pw_gid
        except KeyError:
            uid = gid = 65534
        kwargs.update(user=uid, group=gid, extra_groups=[])
    return _Sandbox(tuple(argv), kwargs)


def _task(program: str, tests: CodeTests) -> dict:
    limit_s = tests.time_limit_s
    rlimits = {"RLIMIT_AS": tests.memory_limit_mb << 20,
               "RLIMIT_CPU": int(limit_s) + 1,
               "RLIMIT_NPROC": tests.max_processes,
               "RLIMIT_FSIZE": 16 << 20,
               "RLIMIT_NOFILE": 256,
               "RLIMIT_CORE": 0}
    task = {"kind": tests.kind, "program": program, "rlimits": rlimits, "time_limit_s": limit_s,
            "max_output_bytes": tests.max_output_bytes}
    if tests.test:
        task.update(test=tests.test, entry_point=tests.entry_point, prompt=tests.prompt)
    else:
        task.update(inputs=list(tests.inputs), outputs=list(tests.outputs))
    return task


def run_sandboxed(program: str, tests: CodeTests) -> tuple[str, str]:
    """Run `program` against `tests` in a fresh sandbox. Returns (reason, detail) with reason
    in REASONS except 'no_code'. Never raises for anything the program does."""
    sandbox = _sandbox()
    token = secrets.token_hex(16)
    task = json.dumps(_task(program, tests)).encode()
    payload = b"%d\n" % len(task) + task + token.encode() + b"\n"
    deadline = time.monotonic() + tests.time_limit_s + STARTUP_SLACK_S
    try:
        proc = subprocess.Popen(sandbox.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True,
                                **sandbox.popen_kwargs)
    except OSError as e:
        return "sandbox_error", f"cannot start bwrap: {e}"
    try:
        out, err, status = code_harness.communicate(proc, payload, deadline, max_stdout=1 << 16)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # bwrap; --die-with-parent takes the rest
        except OSError:
            pass
        proc.kill()
        proc.wait()
    if status == "timeout":
        return "timeout", f"the sandbox ran past {tests.time_limit_s} s + start-up; killed"
    last = out.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
    got_token, _, verdict_text = last[0].partition(" ")
    if not secrets.compare_digest(got_token.encode(), token.encode()):
        # Only bwrap and the harness write to this stderr (the program's goes to the harness).
        # The program cannot end the harness (PID 1 of the sandbox ignores its signals), so no
        # verdict means bwrap or the harness failed.
        errtext = err.decode("utf-8", "replace").strip()
        return "sandbox_error", (f"the sandbox ended without a verdict (exit status "
                                 f"{proc.returncode}): {errtext[-300:]}")
    try:
        verdict = json.loads(verdict_text)
        reason, detail = verdict["reason"], str(verdict.get("detail", ""))
    except (ValueError, KeyError, TypeError):
        return "sandbox_error", f"malformed verdict: {verdict_text[:200]}"
    if reason not in REASONS or reason == "no_code":
        return "sandbox_error", f"unknown verdict {reason!r}"
    return reason, detail


def verify_code(response: str, tests: CodeTests) -> VerifyResult:
    """Check one response against a task's tests. reward 1.0 only for reason 'pass'.
    extracted holds the code taken from the response (at most 2,000 characters)."""
    code = extract_code(response)
    if code is None:
        return VerifyResult(0.0, "no_code", None, "the response holds no code")
    reason, detail = run_sandboxed(program_for(code, tests), tests)
    return VerifyResult(1.0 if reason == "pass" else 0.0, reason, code[:2000], detail)


@functools.lru_cache(maxsize=None)
def _probe() -> str | None:
    """None when a trivial program passes in the sandbox, else why not."""
    try:
        tests = CodeTests(test="def check(f):\n    assert f(2) == 4\n", entry_point="double",
                          time_limit_s=20.0)
        reason, detail = run_sandboxed("def double(x):\n    return 2 * x\n", tests)
    except SandboxUnavailable as e:
        return str(e)
    if reason != "pass":
        return f"a trivial program did not pass in the sandbox ({reason}: {detail})"
    return None


def require_sandbox() -> None:
    """Raise SandboxUnavailable (naming the problem and what to do) unless this machine runs
    the sandbox. Cached per process: costs one sandboxed run the first time."""
    problem = _probe()
    if problem is not None:
        raise SandboxUnavailable(
            f"code verification needs the bubblewrap sandbox, which does not work here: "
            f"{problem}. Options (see README, 'Code verification'): install bubblewrap "
            "(apt-get install -y bubblewrap); allow unprivileged user namespaces "
            "(sysctl kernel.unprivileged_userns_clone=1, or on Ubuntu 24.04 "
            "kernel.apparmor_restrict_unprivileged_userns=0); in Docker run with "
            "--security-opt seccomp=unconfined --security-opt apparmor=unconfined; or verify "
            "code on a machine where these hold. There is no unsandboxed mode.")
