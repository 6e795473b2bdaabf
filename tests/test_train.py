"""The trainer: every algorithm through the CLI, resume after kill -9, SIGTERM, corrupt
checkpoints, non-finite steps, micro-batching, and 1 vs 8 devices."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scope_jax import scoring, step as step_lib
from scope_jax import sharding as shd

sys.path.insert(0, os.path.dirname(__file__))
from tiny_hf import make_toy_setup  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Toy data, a toy tokenizer and two tiny random Qwen3 checkpoints (student, teacher)."""
    return make_toy_setup(tmp_path_factory.mktemp("toy"))


def _cli(setup, workdir, algo, *extra, steps=2):
    return [sys.executable, "-m", "tools.train", "--config", "configs/toy.py", f"--config.algo={algo}",
            f"--config.workdir={workdir}", "--config.toy_dir=", f"--config.student={setup / 'student'}",
            f"--config.teacher={setup / 'teacher'}", f"--config.data.train_files={setup / 'data' / 'train.jsonl'}",
            f"--config.num_steps={steps}", "--config.prompts_per_step=2", "--config.num_samples=4",
            "--config.sampling.max_new_tokens=8", "--config.verifier.num_workers=1",
            "--config.optim.warmup_steps=0", *extra]


def _env():
    # One CPU device: the trainer's own multi-device behaviour is tested in-process below.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


def _tensorboard(workdir, tag="loss"):
    """[(step, value)] of a scalar in the run's TensorBoard event files, read by tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(workdir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.mark.parametrize("algo", ["scope", "opd", "grpo", "kd"])
def test_cli_trains_every_algorithm(setup, tmp_path, algo):
    wd = tmp_path / algo
    # A random tiny teacher is never right: let KD train on all its samples here.
    extra = ["--config.kd_only_correct=False"] if algo == "kd" else []
    subprocess.run(_cli(setup, wd, algo, "--config.checkpoint_every=1", *extra), cwd=ROOT, env=_env(), check=True,
                   capture_output=True, timeout=300)
    rows = _metrics(wd)
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        assert np.isfinite(r["loss"]) and 0.0 <= r["accuracy"] <= 1.0 and r["rollouts"] == 8
        assert r["skipped"] == 0.0
    for tag in ("loss", "accuracy"):  # TensorBoard events beside metrics.jsonl hold the same scalars
        assert _tensorboard(wd, tag) == [(r["step"], pytest.approx(r[tag], rel=1e-6)) for r in rows]
    assert sorted(os.listdir(wd / "checkpoints")) == ["1", "2"]
    from safetensors.numpy import load_file
    exported = load_file(str(wd / "export" / "model.safetensors"))
    initial = load_file(str(setup / "student" / "model.safetensors"))
    assert set(exported) == set(initial)
    # GRPO on a random model sees only zero rewards (zero advantages), so only weight decay
    # moves its weights: compare exactly.
    assert any(not np.array_equal(exported[k], initial[k]) for k in initial), "the export must hold trained weights"


def test_kill9_then_resume_reproduces_uninterrupted_run(setup, tmp_path):
    steps = 4
    subprocess.run(_cli(setup, tmp_path / "a", "scope", steps=steps), cwd=ROOT, env=_env(), check=True,
                   capture_output=True, timeout=300)
    reference = _metrics(tmp_path / "a")

    wd = tmp_path / "b"
    args = _cli(setup, wd, "scope", "--config.checkpoint_every=1", steps=steps)
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not os.path.exists(wd / "checkpoints" / "2") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; test is void"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(_metrics(wd))
    assert killed_at < steps
    subprocess.run(args, cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=300)
    resumed = _metrics(wd)
    assert [r["step"] for r in resumed] == list(range(steps))
    # The resumed run's TensorBoard events replace the killed run's from the restored step on.
    assert _tensorboard(wd) == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in resumed]
    for a, b in zip(reference, resumed):
        for key in ("loss", "accuracy", "grad_norm", "wrong/teacher_ppl", "response_length"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)


def test_sigterm_writes_a_checkpoint_and_exits(setup, tmp_path):
    wd = tmp_path / "t"
    proc = subprocess.Popen(_cli(setup, wd, "opd", "--config.checkpoint_every=1000", steps=1000), cwd=ROOT,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(wd / "metrics.jsonl") and _metrics(wd):
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    done = len(_metrics(wd))
    assert 1 <= done < 1000
    assert sorted(os.listdir(wd / "checkpoints")) == [str(done)]
    assert b"stopped by signal" in err


# ------------------------------------------------------------------------------------------------
# In-process: the pure step.
# ------------------------------------------------------------------------------------------------


def _cfg(algo="scope", micro_batches=1):
    from configs import toy as toy_config

    c = toy_config.get_config()
    c.algo, c.micro_batches = algo, micro_batches
    return c


def _batch(setup, b=8, p=6, m=7, seed=0):
    """A fixed rollout batch: random prompts and responses, mixed labels, 2 prompts x 4 rollouts."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, 200, (b, p + m)).astype(np.int32)  # the toy vocabulary is larger (fixture)
    prompt_len = rng.integers(2, p + 1, b)
    resp_len = rng.integers(1, m + 1, b)
    attn = np.concatenate([np.arange(p)[None] >= (p - prompt_len)[:, None], np.arange(m)[None] < resp_len[:, None]], 1)
    resp = np.arange(m)[None] < resp_len[:, None]
    old = np.where(resp, np.log(rng.uniform(0.01, 1, (b, m))), 0).astype(np.float32)
    tea = np.where(resp, np.log(rng.uniform(0.01, 1, (b, m))), 0).astype(np.float32)
    return step_lib.Rollouts(
        input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(attn), response_mask=jnp.asarray(resp),
        old_logprobs=jnp.asarray(old), teacher_logprobs=jnp.asarray(tea), ref_logprobs=jnp.asarray(old),
        correct=jnp.asarray(rng.random(b) < 0.5), group_ids=jnp.asarray(np.arange(b) // 4, dtype=jnp.int32))


def _state(setup, cfg, mesh):
    from scope_jax.models import load_hf

    model = load_hf(setup / "student", mesh=mesh)
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    opt = step_lib.make_optimizer(cfg)
    state = step_lib.TrainState(params=params, opt_state=opt.init(params), step=jnp.zeros((), jnp.int32))
    return graphdef, opt, state


@pytest.mark.parametrize("algo", ["scope", "kd"])
def test_loss_falls_on_a_fixed_batch(setup, algo):
    cfg = _cfg(algo)
    cfg.optim.lr = 3e-3
    mesh = shd.make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
    graphdef, opt, state = _state(setup, cfg, mesh)
    batch = _batch(setup)
    if algo == "kd":
        batch = batch.replace(correct=jnp.ones(8, bool))
    step = jax.jit(step_lib.make_train_step(cfg, graphdef, opt))
    first = None
    for _ in range(8):
        state, m = step(state, batch)
        first = float(m["loss"]) if first is None else first
    assert float(m["loss"]) < first - 0.1 * abs(first), (first, float(m["loss"]))


def test_policy_logprobs_are_the_behaviour_policy_at_the_rollout_temperature(setup):
    # pi_old must be the distribution the rollouts were drawn from (scope_jax/losses.py docstring, Notation):
    # at temperature T (top-k / top-p off) that is softmax(logits / T), the sampler's `logprobs`.
    from scope_jax import sampling
    from scope_jax.models import load_hf

    model = load_hf(setup / "student")
    prompts = [[5, 6, 7, 8], [9, 10]]
    out = sampling.generate(model, prompts, num_samples=3, max_new_tokens=6, temperature=0.6,
                            key=jax.random.key(0), eos_ids=[3], pad_id=0)
    ids, mask = sampling.full_sequences(out)
    m = out.tokens.shape[1]
    cfg = _cfg("scope")
    cfg.sampling.temperature = 0.6
    assert step_lib.policy_temperature(cfg) == 0.6
    resp = np.asarray(out.response_mask)
    at_t = scoring.response_logprobs(model, ids, mask, m, temperature=step_lib.policy_temperature(cfg))
    np.testing.assert_allclose(np.asarray(at_t)[resp], np.asarray(out.logprobs)[resp], atol=1e-4)
    raw = scoring.response_logprobs(model, ids, mask, m)
    np.testing.assert_allclose(np.asarray(raw)[resp], np.asarray(out.policy_logprobs)[resp], atol=1e-4)
    assert np.abs(np.asarray(raw - at_t)[resp]).max() > 1e-2  # the two differ: the test can fail
    cfg.logprob_temperature = 1.0
    assert step_lib.policy_temperature(cfg) == 1.0
    cfg.logprob_temperature, cfg.sampling.temperature = None, 0.0  # greedy rollouts: the raw policy
    assert step_lib.policy_temperature(cfg) == 1.0
    cfg.algo, cfg.sampling.temperature = "kd", 0.6  # KD is NLL of the teacher's samples
    assert step_lib.policy_temperature(cfg) == 1.0


@pytest.mark.parametrize("algo", ["scope", "opd", "grpo"])
def test_micro_batches_give_the_full_batch_update(setup, algo):
    # Strided micro-batches split every prompt's rollouts: per-prompt weights (SCOPE's, OPD's
    # 1 / N) and advantages must come from the full batch.
    mesh = shd.make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
    batch = _batch(setup, seed=3)
    results = []
    for n in (1, 2, 4):
        cfg = _cfg(algo, micro_batches=n)
        graphdef, opt, state = _state(setup, cfg, mesh)
        state, m = jax.jit(step_lib.make_train_step(cfg, graphdef, opt))(state, batch)
        results.append((float(m["loss"]), state.params))
    for loss, params in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5)
        for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_one_device_and_eight_devices_give_the_same_step(setup):
    assert len(jax.devices()) == 8
    batch = _batch(setup, seed=5)
    out = []
    for mesh in (shd.make_mesh({"fsdp": 1}, devices=jax.devices()[:1]), shd.make_mesh({"data": 2, "fsdp": 4})):
        cfg = _cfg("scope")
        graphdef, opt, state = _state(setup, cfg, mesh)
        state_sh = step_lib.state_shardings(opt, jax.tree.map(lambda x: x.sharding, state.params), mesh, state.params)
        step = step_lib.build_step(cfg, graphdef, opt, state_sh, mesh)
        with jax.set_mesh(mesh):
            state, m = step(jax.device_put(state, state_sh), jax.device_put(batch, shd.batch_sharding(mesh)))
        out.append((float(m["loss"]), jax.device_get(state.params)))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-5)
    for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_non_finite_step_is_skipped(setup):
    cfg = _cfg("scope")
    mesh = shd.make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
    graphdef, opt, state = _state(setup, cfg, mesh)
    batch = _batch(setup)
    batch = batch.replace(teacher_logprobs=batch.teacher_logprobs.at[0, 0].set(jnp.nan),
                          correct=batch.correct.at[0].set(False), response_mask=batch.response_mask.at[0, 0].set(True))
    before = jax.device_get(state.params)
    state, m = jax.jit(step_lib.make_train_step(cfg, graphdef, opt))(state, batch)
    assert float(m["skipped"]) == 1.0 and not np.isfinite(float(m["loss"]))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params))):
        np.testing.assert_array_equal(a, b)
    assert int(state.step) == 1


def test_corrupt_latest_checkpoint_falls_back_with_a_clear_message(tmp_path, caplog):
    from scope_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(str(tmp_path / "ckpt"), max_to_keep=3, async_save=False)
    template = step_lib.TrainState(params={"w": jnp.zeros((3, 4))}, opt_state=(jnp.zeros(2),), step=jnp.zeros((), jnp.int32))
    for step in (1, 2):
        ckpt.save(template.replace(params={"w": jnp.full((3, 4), float(step))}, step=jnp.asarray(step, jnp.int32)), wait=True)
    # Corrupt every file of the latest checkpoint (a run killed while writing, a bad disk).
    for root, _, files in os.walk(tmp_path / "ckpt" / "2"):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"\0garbage")
    with caplog.at_level(logging.ERROR):
        got = ckpt.restore_latest(template)
    assert int(got.step) == 1 and float(got.params["w"][0, 0]) == 1.0
    assert "checkpoint" in caplog.text and "/2 failed verification (unreadable" in caplog.text
    assert os.listdir(tmp_path / "ckpt" / "corrupt") == ["2-unreadable"]  # moved aside, not deleted
    ckpt.close()


def _student_arch(config: str) -> dict:
    import importlib

    module = os.path.basename(config).split(".py")[0]
    return importlib.import_module(f"configs.{module}").get_config().arch.student.to_dict()


def _param_count(a: dict) -> int:
    """Parameters of a Qwen2 / Qwen3 decoder from its config.json values, counted by hand."""
    h, v, i, n = a["hidden_size"], a["vocab_size"], a["intermediate_size"], a["num_hidden_layers"]
    q, kv = a["num_attention_heads"], a["num_key_value_heads"]
    d = a.get("head_dim", h // q)
    attention = h * q * d + 2 * h * kv * d + q * d * h
    if a["model_type"] == "qwen2":
        attention += q * d + 2 * kv * d  # q / k / v biases
    else:
        attention += 2 * d  # q_norm, k_norm
    layer = attention + 3 * h * i + 2 * h  # + gate / up / down, two RMSNorms
    return v * h * (1 if a["tie_word_embeddings"] else 2) + n * layer + h


@pytest.mark.parametrize("config", ["configs/paper_r1_1p5b.py", "configs/paper_qwen3_1p7b.py:grpo"])
def test_paper_configs_build_on_a_256_chip_layout(config):
    env = _env()
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=256"
    out = subprocess.run([sys.executable, "-m", "tools.train", "--config", config, "--dry_run"], cwd=ROOT, env=env,
                         check=True, capture_output=True, timeout=300, text=True).stdout
    report = json.loads(out[out.index("{"):])
    assert report["devices"] == 256 and report["mesh"] == {"data": 1, "fsdp": 64, "tensor": 4}
    assert report["batch"]["rollouts"] == 256 * 8 and report["batch"]["sequence"] == 4096 + 12288
    # Qwen2-1.5B: 1.78e9 parameters (untied); Qwen3-1.7B-Base: 1.72e9 (tied).
    assert report["student"]["params"] == _param_count(_student_arch(config))
    assert report["student"]["param_bytes_per_device"] < 4 * report["student"]["params"] / 64
    assert "loss" in report["train_step"]["metrics"]


def test_two_processes_match_one_process(setup, tmp_path):
    """2 local processes (1 CPU device each, gloo collectives) train on the same global batch as
    1 process: each host samples, verifies and scores its half; the step is one global program."""
    from tiny_hf import run_two_processes

    common = ["--config.sampling.temperature=0.0", "--config.prompts_per_step=4", "--config.num_samples=2",
              "--config.checkpoint_every=1"]
    subprocess.run(_cli(setup, tmp_path / "one", "scope", *common), cwd=ROOT, env=_env(), check=True,
                   capture_output=True, timeout=300)
    run_two_processes(_cli(setup, tmp_path / "two", "scope", *common), ROOT, _env())
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [0, 1] and all(r["rollouts"] == 4 for r in two)  # 4 of 8 per host
    for a, b in zip(one, two):
        for key in ("loss", "accuracy", "grad_norm", "wrong/teacher_ppl", "correct/student_ppl", "response_length"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["1", "2"]
