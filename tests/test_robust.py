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
from tiny_hf import make_tiny_checkpoint  # noqa: E402


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
    r = subprocess.run(limited + _cli(setup, wd, "scope", "--config.checkpoint_every=1", steps=1), cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 1
    line = _last_line(r.stderr)
    assert line.startswith(f"error: {wd / 'checkpoints'}/") and line.endswith("File too large (errno 27)"), \
        r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
