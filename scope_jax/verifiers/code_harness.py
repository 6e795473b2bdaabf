"""The checker that runs INSIDE the code sandbox (standard library only; Python 3.9+).

scope_jax.verifiers.code starts it as ``python -I -S -c <this file's text>`` inside bubblewrap.
It is trusted code; the program under test is not, so the program never runs in this process:

* This process (the harness) reads the task from stdin: b"<n>\\n" + n bytes of JSON. It is PID 1
  of the sandbox (bwrap --as-pid-1), so no signal from the program reaches it, and it makes
  itself non-dumpable, so that no other process of the sandbox can ptrace it, read its memory
  or open its file descriptors through /proc.
* Each run of the program is a process forked from a "zygote", itself a fork of the harness
  made before the task was read: so it inherits none of the tests, expected outputs or the
  token, and costs a fork rather than an interpreter start. Resource limits are set before a
  line of the program runs; it has its own session and only pipes to the harness.
* Function tests (HumanEval ``check(candidate)``): the harness executes the problem prompt and
  the test code itself and calls ``check`` with a proxy; each call of the proxy is sent to the
  program's process as Python literals and its result comes back as a literal
  (ast.literal_eval). A program therefore cannot patch the checker (AssertionError, builtins,
  ``check``), cannot return objects whose ``__eq__`` lies, and cannot end the check early.
* Stdin/stdout tests: one fresh process per case; output read up to a size limit and compared
  token by token (numbers within 1e-6).
* When everything is done the harness kills every other process of the sandbox
  (``kill(-1, SIGKILL)`` in its own PID namespace), THEN reads the per-run token that follows the
  task on stdin, and prints ``<token> <verdict JSON>``. A program can only produce that line by
  knowing the token, which no process of the program could read.

``communicate`` is also used outside the sandbox, to talk to the bwrap process.
"""
import ast
import builtins
import json
import math
import os
import re
import selectors
import signal
import socket
import sys
import time

# The program's side. It runs in a process forked from the zygote (a fork of the harness made
# before the task was read, so it holds no test, expected output or token): fds 0-2 are the
# program's stdio, 3 the control input, 4 the control output. The first control line is the
# configuration: rlimits {name: value}, mode, entry_point, program.
CHILD = r'''
import ast, builtins, json, os, resource, sys
_rin = os.fdopen(3, "rb")
def _send(kind, payload=""):
    data = (kind + " " + json.dumps(payload) + "\n").encode()
    while data:
        data = data[os.write(4, data):]
def _exc(e):
    return [type(e).__name__, str(e)[:300]]
def _exit(code):
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except BaseException:
            pass
    os._exit(code)
cfg = json.loads(_rin.readline())
for _name, _value in cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, _name), (_value, _value))
_src = cfg.pop("program")
try:
    _code = compile(_src, "<program>", "exec")
except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError) as e:
    _send("syntax", _exc(e))
    _exit(3)
del _src
_ns = {"__name__": "__main__" if cfg["mode"] == "stdio" else "__program__",
       "__builtins__": builtins}
if cfg["mode"] == "stdio":
    try:
        exec(_code, _ns)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            _exit(0 if e.code is None else e.code & 255)
        print(e.code, file=sys.stderr)
        _exit(1)
    except BaseException as e:
        _send("exc", _exc(e))
        import traceback
        traceback.print_exc()
        _exit(1)
    _exit(0)
try:
    exec(_code, _ns)
    _fn = _ns.get(cfg["entry_point"])
    if _fn is None and isinstance(_ns.get("Solution"), type):  # LeetCode style (TACO)
        _fn = getattr(_ns["Solution"](), cfg["entry_point"], None)
    if not callable(_fn):
        raise NameError("the program does not define " + repr(cfg["entry_point"]))
except BaseException as e:
    _send("exc", _exc(e))
    _exit(1)
_send("loaded")
for _line in _rin:
    _args, _kwargs = ast.literal_eval(json.loads(_line))
    try:
        _value = _fn(*_args, **_kwargs)
        _send("ok", repr(_value))
    except BaseException as e:
        _send("exc", _exc(e))
_exit(0)
'''

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def outputs_match(got: str, expected: str) -> bool:
    """Whitespace-insensitive comparison of a program's output with the expected output: equal
    token sequences, where two numeric tokens also match within 1e-6 (absolute or relative)."""
    a, b = got.split(), expected.split()
    if a == b:
        return True
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x == y:
            continue
        if not (_NUMBER.match(x) and _NUMBER.match(y)):
            return False
        if not math.isclose(float(x), float(y), rel_tol=1e-6, abs_tol=1e-6):
            return False
    return True


def communicate(proc, data: bytes, deadline: float, max_stdout: int, max_stderr: int = 65536,
                extra_read=None, on_extra=None):
    """Write `data` to proc.stdin (then close it) while reading proc.stdout / proc.stderr, until
    both reach EOF, the deadline (time.monotonic()) passes, or stdout exceeds max_stdout bytes.
    stderr keeps only its last max_stderr bytes, and more than max_stdout bytes of it in all
    also end the exchange with 'output_limit'. extra_read: another readable fd whose chunks go
    to on_extra(chunk) (the control pipe). Returns (stdout bytes, stderr bytes, status) with
    status 'eof', 'timeout' or 'output_limit'. Never waits for the process to exit."""
    sel = selectors.DefaultSelector()
    out, err = bytearray(), bytearray()
    if proc.stdin is not None:
        if data:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
    for f in (proc.stdout, proc.stderr):
        if f is not None:
            sel.register(f, selectors.EVENT_READ)
    if extra_read is not None:
        sel.register(extra_read, selectors.EVENT_READ)
    view, pos, status, err_total = memoryview(data), 0, "eof", 0
    try:
        while any(k.fileobj is not extra_read for k in sel.get_map().values()):
            left = deadline - time.monotonic()
            if left <= 0:
                status = "timeout"
                break
            for key, _ in sel.select(left):
                f = key.fileobj
                if f is proc.stdin:
                    try:
                        pos += os.write(f.fileno(), view[pos:pos + 65536])
                    except BlockingIOError:
                        continue
                    except (BrokenPipeError, OSError):
                        pos = len(data)
                    if pos >= len(data):
                        sel.unregister(f)
                        f.close()
                    continue
                fd = f if isinstance(f, int) else f.fileno()
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(f)
                elif f is extra_read:
                    on_extra(chunk)
                elif f is proc.stdout:
                    out += chunk
                    if len(out) > max_stdout:
                        return bytes(out[:max_stdout]), bytes(err), "output_limit"
                else:
                    err += chunk
                    del err[:-max_stderr]
                    err_total += len(chunk)
                    if err_total > max_stdout:
                        return bytes(out), bytes(err), "output_limit"
    finally:
        sel.close()
    return bytes(out), bytes(err), status


# ----------------------------------------------------------------------------- harness side


def _non_dumpable() -> None:
    # PR_SET_DUMPABLE = 4. A non-dumpable process's /proc entries belong to root, so the program
    # (same uid, no capabilities) can neither ptrace this process nor read /proc/<pid>/mem or fd/.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def _read_line(fd: int, limit: int = 64) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        c = os.read(fd, 1)
        if not c or len(line) > limit:
            raise RuntimeError("harness: truncated header on stdin")
        line += c
    return line


def _read_exact(fd: int, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        c = os.read(fd, min(n - got, 1 << 20))
        if not c:
            raise RuntimeError("harness: truncated task on stdin")
        chunks.append(c)
        got += len(c)
    return b"".join(chunks)


class _Fatal(BaseException):
    """The program's process timed out, ran out of memory, flooded its output or died. A
    BaseException, so that test code catching Exception cannot swallow it."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class _Zygote:
    """A fork of the harness made before the task is read; it forks one process per run of the
    program, so a run costs a fork instead of an interpreter start, and inherits nothing
    secret. Protocol over a socket pair, one run at a time: the harness sends b"run" with the
    run's five fds (stdin, stdout, stderr, control in, control out); the zygote answers the
    run's pid, then its exit code when it ends (negative: killed by that signal)."""

    def __init__(self):
        self.sock, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            try:
                self.sock.close()
                _serve(theirs)
            finally:
                os._exit(0)
        theirs.close()
        self.pid, self.buf, self.dead = pid, b"", False

    def alive(self) -> bool:
        """False once the zygote has died: only the program (its child) can have killed it,
        and a program that kills its parent fails, whatever it answers."""
        if not self.dead:
            try:
                self.dead = os.waitpid(self.pid, os.WNOHANG) != (0, 0)
            except ChildProcessError:
                self.dead = True
        return not self.dead

    def spawn(self, fds, deadline: float) -> int:
        try:
            socket.send_fds(self.sock, [b"run"], fds)
        except OSError:
            self.dead = True
            raise _Fatal("fail", "the program killed its parent process") from None
        return self.read_int(deadline)

    def read_int(self, deadline: float) -> int:
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sel = selectors.DefaultSelector()
            sel.register(self.sock, selectors.EVENT_READ)
            ready = sel.select(left)
            sel.close()
            if ready:
                chunk = self.sock.recv(64)
                if not chunk:  # the zygote has exited: it can only have been killed
                    self.dead = True
                    raise _Fatal("fail", "the program killed its parent process")
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return int(line)


def _serve(sock) -> None:
    """The zygote's loop (see _Zygote)."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # not the harness's stdin (the token) nor its stdout (the verdict)
        os.dup2(devnull, fd)
    while True:
        msg, fds, _, _ = socket.recv_fds(sock, 16, 5)
        if not msg or len(fds) != 5:
            return
        pid = os.fork()
        if pid == 0:
            try:
                sock.close()
                os.setsid()
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                os.closerange(5, 1 << 16)
                exec(compile(CHILD, "<child>", "exec"), {"__name__": "__child__"})
            finally:
                os._exit(1)
        for fd in fds:
            os.close(fd)
        sock.sendall(b"%d\n" % pid)
        _, status = os.waitpid(pid, 0)
        sock.sendall(b"%d\n" % os.waitstatus_to_exitcode(status))


class _Program:
    """One run of the program (a process forked by the zygote): its pipes, limits, deadline.
    Has stdin / stdout / stderr file objects for communicate()."""

    def __init__(self, task: dict, mode: str, deadline: float, zygote: _Zygote):
        self.deadline, self.zygote = deadline, zygote
        self.max_out = int(task["max_output_bytes"])
        pipes = [os.pipe() for _ in range(5)]  # stdin, stdout, stderr, control in, control out
        theirs = [pipes[0][0], pipes[1][1], pipes[2][1], pipes[3][0], pipes[4][1]]
        self.returncode = None
        try:
            self.pid = zygote.spawn(theirs, deadline)
        except TimeoutError:
            raise _Fatal("timeout", "time limit exceeded") from None
        finally:
            for fd in theirs:
                os.close(fd)
        self.stdin = os.fdopen(pipes[0][1], "wb", buffering=0)
        self.stdout = os.fdopen(pipes[1][0], "rb", buffering=0)
        self.stderr = os.fdopen(pipes[2][0], "rb", buffering=0)
        self.w_in, self.r_out = pipes[3][1], pipes[4][0]
        if mode == "function":
            self.stdin.close()
        self.ctl = bytearray()
        self.fatal = None  # the first _Fatal raised by a call, kept in case check() swallows it
        cfg = {"rlimits": task["rlimits"], "mode": mode, "program": task["program"],
               "entry_point": task.get("entry_point", "")}
        self._send_line(json.dumps(cfg).encode() + b"\n")

    def wait(self, deadline: float) -> int:
        """The exit code (negative: the signal); raises TimeoutError at the deadline."""
        if self.returncode is None:
            self.returncode = self.zygote.read_int(deadline)
        return self.returncode

    def _send_line(self, data: bytes) -> None:
        try:
            self._write_all(data)  # never blocks past the deadline, even on a full pipe
        except (BrokenPipeError, OSError):
            pass  # it died; the next read reports how

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            left = self.deadline - time.monotonic()
            if left <= 0:
                return
            sel = selectors.DefaultSelector()
            sel.register(self.w_in, selectors.EVENT_WRITE)
            ready = sel.select(left)
            sel.close()
            if ready:
                os.set_blocking(self.w_in, False)
                try:
                    view = view[os.write(self.w_in, view[:65536]):]
                except BlockingIOError:
                    pass
                finally:
                    os.set_blocking(self.w_in, True)

    def next_message(self):
        """The next control message (kind, payload), draining stdout / stderr meanwhile.
        Raises _Fatal on timeout, output flood, or the process ending first."""
        while b"\n" not in self.ctl:
            if len(self.ctl) > 4 * self.max_out:
                self.kill()
                raise _Fatal("fail", "the program's reply exceeds the output limit")
            got = bytearray()
            sel = selectors.DefaultSelector()
            for f in (self.stdout, self.stderr):
                if f is not None and not f.closed:
                    sel.register(f, selectors.EVENT_READ)
            sel.register(self.r_out, selectors.EVENT_READ)
            left = self.deadline - time.monotonic()
            if left <= 0:
                sel.close()
                self.kill()
                raise _Fatal("timeout", "time limit exceeded")
            for key, _ in sel.select(left):
                f = key.fileobj
                chunk = os.read(f if isinstance(f, int) else f.fileno(), 65536)
                if f is self.r_out:
                    if not chunk:
                        sel.close()
                        raise self._died()
                    got += chunk
                elif not chunk:
                    f.close()
                else:  # stdout or stderr: both count against the output limit
                    self.max_out -= len(chunk)
                    if self.max_out < 0:
                        sel.close()
                        self.kill()
                        raise _Fatal("fail", "output limit exceeded")
            sel.close()
            self.ctl += got
        line, _, rest = bytes(self.ctl).partition(b"\n")
        self.ctl = bytearray(rest)
        kind, _, payload = line.decode("utf-8", "replace").partition(" ")
        try:
            return kind, json.loads(payload)
        except ValueError:
            return kind, None

    def _died(self) -> _Fatal:
        try:
            code = self.wait(max(self.deadline, time.monotonic() + 0.05))
        except TimeoutError:
            self.kill()
            return _Fatal("fail", "the program closed its control pipe")
        if code == -signal.SIGXCPU:
            return _Fatal("timeout", "CPU time limit exceeded")
        return _Fatal("fail", f"the program exited (status {code}) before answering")

    def call(self, args: tuple, kwargs: dict):
        """candidate(*args, **kwargs) in the program's process; the result as a literal."""
        try:
            request = repr((tuple(args), dict(kwargs)))
            ast.literal_eval(request)
        except Exception as e:
            raise _Fatal("sandbox_error", f"an argument is not a Python literal: {e}") from None
        self._send_line(json.dumps(request).encode() + b"\n")
        try:
            kind, payload = self.next_message()
        except _Fatal as e:
            self.fatal = self.fatal or e
            raise
        if kind == "ok" and isinstance(payload, str):
            try:
                return ast.literal_eval(payload)
            except Exception:
                if payload in ("nan", "inf", "-inf"):
                    return float(payload)
                raise TypeError("the candidate returned a value that is not a plain Python "
                                f"literal: {payload[:100]}") from None
        if kind == "exc" and isinstance(payload, list) and len(payload) == 2:
            name, msg = str(payload[0]), str(payload[1])
            if name == "MemoryError":
                self.fatal = self.fatal or _Fatal("memory", "MemoryError in the candidate")
                raise self.fatal
            cls = getattr(builtins, name, None)
            if not (isinstance(cls, type) and issubclass(cls, Exception)):
                cls = RuntimeError
            raise cls(f"{name} in the candidate: {msg}")
        raise RuntimeError(f"unexpected reply from the candidate: {kind} {str(payload)[:100]}")

    def drain_control(self) -> bytes:
        """The rest of the control pipe, after the process has exited."""
        chunks = [bytes(self.ctl)]
        os.set_blocking(self.r_out, False)
        try:
            while True:
                chunk = os.read(self.r_out, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except (BlockingIOError, OSError):
            pass
        return b"".join(chunks)

    def kill(self) -> None:
        """Kill the program's session, wait for the zygote to reap it, close every pipe."""
        if self.returncode is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                self.wait(time.monotonic() + 10.0)
            except (TimeoutError, _Fatal):
                pass
        for f in (self.stdin, self.stdout, self.stderr):
            if f is not None and not f.closed:
                try:
                    f.close()
                except OSError:
                    pass
        for fd in (self.w_in, self.r_out):
            try:
                os.close(fd)
            except OSError:
                pass
        self.w_in = self.r_out = -1


def _load_failure(kind: str, payload) -> dict:
    text = ": ".join(map(str, payload)) if isinstance(payload, list) else str(payload)
    if kind == "syntax":
        return {"reason": "syntax", "detail": text[:300]}
    if kind == "exc" and isinstance(payload, list) and payload and payload[0] == "MemoryError":
        return {"reason": "memory", "detail": text[:300]}
    return {"reason": "fail", "detail": f"loading the program failed: {text}"[:300]}


def run_function(task: dict, deadline: float, zygote: _Zygote) -> dict:
    """HumanEval-style tests: check(candidate) runs here, the candidate in the program."""
    try:
        prog = _Program(task, "function", deadline, zygote)
    except _Fatal as e:
        return {"reason": e.reason, "detail": e.detail}
    try:
        kind, payload = prog.next_message()
        if kind != "loaded":
            return _load_failure(kind, payload)
        ns = {"__name__": "__check__"}
        exec(compile(task["prompt"], "<prompt>", "exec"), ns)
        exec(compile(task["test"], "<test>", "exec"), ns)

        def candidate(*args, **kwargs):
            return prog.call(args, kwargs)

        # As in HumanEval's harness, where the test runs in the program's namespace, the entry
        # point's global name is the program's function (HumanEval/33's check calls it).
        ns[task["entry_point"]] = candidate

        try:
            ns["check"](candidate)
        except AssertionError as e:
            return {"reason": "fail", "detail": f"assertion failed {e}"[:300]}
        except Exception as e:
            return {"reason": "fail", "detail": f"{type(e).__name__}: {e}"[:300]}
        if prog.fatal is not None:  # check() caught the failure of a call; it still counts
            raise prog.fatal
        # Once the zygote has reported the program's exit, a SIGKILL the program sent it before
        # can no longer be pending: it would have ended the zygote first (EOF instead).
        prog.kill()
        if not zygote.alive():
            return {"reason": "fail", "detail": "the program killed its parent process"}
        return {"reason": "pass", "detail": ""}
    except _Fatal as e:
        return {"reason": e.reason, "detail": e.detail}
    finally:
        prog.kill()


def run_stdio(task: dict, deadline: float, zygote: _Zygote) -> dict:
    """Stdin/stdout tests: a fresh process per case; stops at the first failing case."""
    cases = list(zip(task["inputs"], task["outputs"]))
    for i, (inp, expected) in enumerate(cases):
        prog = _Program(dict(task, max_output_bytes=max(int(task["max_output_bytes"]),
                                                          2 * len(expected) + 4096)),
                        "stdio", deadline, zygote)
        try:
            out, err, status = communicate(prog, inp.encode(), deadline, prog.max_out,
                                           extra_read=prog.r_out, on_extra=prog.ctl.extend)
            if status == "eof":
                try:
                    code = prog.wait(deadline)
                except TimeoutError:
                    status = "timeout"
            control = prog.drain_control()
        finally:
            prog.kill()
        where = f"case {i + 1} of {len(cases)}"
        if status == "timeout":
            return {"reason": "timeout", "detail": f"time limit exceeded at {where}"}
        if status == "output_limit":
            return {"reason": "fail", "detail": f"output limit exceeded at {where}"}
        for line in control.decode("utf-8", "replace").splitlines():
            kind, _, payload = line.partition(" ")
            if kind in ("syntax", "exc"):
                try:
                    failure = _load_failure(kind, json.loads(payload))
                except ValueError:
                    continue
                if failure["reason"] != "fail":
                    return failure
        if code == -signal.SIGXCPU:
            return {"reason": "timeout", "detail": f"CPU time limit exceeded at {where}"}
        if code != 0:
            tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
            return {"reason": "fail", "detail": f"exit status {code} at {where}: {tail[0]}"[:300]}
        if not outputs_match(out.decode("utf-8", "replace"), expected):
            return {"reason": "fail", "detail": f"wrong answer at {where}"}
    if not zygote.alive():
        return {"reason": "fail", "detail": "the program killed its parent process"}
    return {"reason": "pass", "detail": f"{len(cases)} cases"}


def _kill_everything_else() -> None:
    # This is PID 1 of the sandbox's PID namespace; kill(-1) reaches every other process in it:
    # whatever the program left behind (daemons, fork bombs) is gone before the token is read.
    for _ in range(2):
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break


def main() -> None:
    if os.getpid() != 1:  # kill(-1) below must only ever run in the sandbox's own PID namespace
        raise SystemExit("code_harness: not in a fresh PID namespace; run it through "
                         "scope_jax.verifiers.code")
    _non_dumpable()
    # As PID 1 of its namespace the harness gets only the signals it handles; Python handles
    # SIGINT (KeyboardInterrupt), which the program could otherwise send it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    zygote = _Zygote()  # before the task is read
    n = int(_read_line(0))
    task = json.loads(_read_exact(0, n))
    deadline = time.monotonic() + float(task["time_limit_s"])
    try:
        run = run_function if task["kind"] == "function" else run_stdio
        try:
            verdict = run(task, deadline, zygote)
        except _Fatal as e:
            verdict = {"reason": e.reason, "detail": e.detail}
    except Exception as e:  # a harness or test-code failure, not the program's
        verdict = {"reason": "sandbox_error", "detail": f"harness: {type(e).__name__}: {e}"[:300]}
    _kill_everything_else()
    token = _read_line(0).strip().decode()
    sys.stdout.write(token + " " + json.dumps(verdict) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
