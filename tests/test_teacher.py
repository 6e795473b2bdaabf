"""The teacher-scoring interface: co-located vs remote log-probs, the scoring server against
transformers through the official openai client, malformed requests, and SCOPE runs with the
teacher on a server (equal to the co-located run; the server killed mid-run loses nothing)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from scope_jax import teacher as teachers
from scope_jax.models import load_hf

sys.path.insert(0, os.path.dirname(__file__))
from tiny_hf import make_toy_setup, swap_tokens  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int = 1):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _start_server(model_dir, port: int, devices: int = 1, log_path=None):
    """`python -m tools.serve_teacher` in a subprocess; returns it once /health answers."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "tools.serve_teacher", "--model", str(model_dir),
                             "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, env=_env(devices),
                            stdout=out, stderr=out)
    deadline = time.time() + 180
    while time.time() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode} (log: {log_path})"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("the teacher server did not come up")


def _stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Toy data and tokenizer, a tiny Qwen3 student and a tiny Qwen2 teacher (biases, untied head)."""
    return make_toy_setup(tmp_path_factory.mktemp("toy"), teacher_family="qwen2", teacher_tied=False)


@pytest.fixture(scope="module")
def server(setup):
    """The teacher served on 2 (fake CPU) devices, so rows and parameters are sharded."""
    port = _free_port()
    proc = _start_server(setup / "teacher", port, devices=2, log_path=setup / "server.log")
    yield f"http://127.0.0.1:{port}/v1"
    _stop(proc)
    # uvicorn drains, runs the shutdown, then re-raises SIGTERM: the exit status says "terminated".
    assert proc.returncode in (0, -signal.SIGTERM), proc.returncode
    assert "Application shutdown complete" in (setup / "server.log").read_text()


def _rows(vocab: int, seed: int = 0):
    """Trainer-layout rows: left-padded prompts of 1..8 tokens, right-padded responses of 0..6."""
    rng = np.random.default_rng(seed)
    p, m = 8, 6
    prompt_lens, resp_lens = [1, 8, 3, 5, 8, 2, 7], [6, 6, 0, 2, 1, 5, 4]
    ids = rng.integers(3, vocab, (len(prompt_lens), p + m)).astype(np.int32)
    mask = np.zeros(ids.shape, bool)
    for i, (a, b) in enumerate(zip(prompt_lens, resp_lens)):
        mask[i, p - a: p + b] = True
    return np.where(mask, ids, 0).astype(np.int32), mask, m


def test_topk_logprobs_matches_numpy():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2, 3, 8)).astype(np.float32)
    lm_head = rng.normal(size=(8, 37)).astype(np.float32)  # 37 = 4 tiles of 10, the last slid back
    ids, lps = teachers.topk_logprobs(hidden, lm_head, 5, chunk_size=10, temperature=0.7)
    logits = (hidden.astype(np.float64) @ lm_head) / 0.7
    ref = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    order = np.argsort(-ref, -1)[..., :5]
    np.testing.assert_array_equal(np.asarray(ids), order)
    np.testing.assert_allclose(np.asarray(lps), np.take_along_axis(ref, order, -1), atol=1e-5)


def test_remote_logprobs_equal_colocated(setup, server):
    model = load_hf(setup / "teacher")
    ids, mask, m = _rows(model.config.vocab_size)
    local = teachers.LocalTeacher(model).score(ids, mask, m, top_k=3)
    remote_teacher = teachers.RemoteTeacher(server, batch_size=2, max_concurrency=3)  # 4 requests, 3 at once
    try:
        remote = remote_teacher.score(ids, mask, m, top_k=3)
    finally:
        remote_teacher.close()
    resp = mask[:, -m:]
    lp_local, lp_remote = np.asarray(local.logprobs), np.asarray(remote.logprobs)
    assert np.all(lp_local[~resp] == 0) and np.all(lp_remote[~resp] == 0)
    assert np.all(lp_local[resp] < 0)
    np.testing.assert_allclose(lp_remote, lp_local, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(remote.top_ids)[resp], np.asarray(local.top_ids)[resp])
    np.testing.assert_allclose(np.asarray(remote.top_logprobs)[resp], np.asarray(local.top_logprobs)[resp], atol=1e-5)

    # The co-located top-k against a full log-softmax of the model's logits (numpy).
    logits = np.asarray(model(ids, attention_mask=mask), np.float64)[:, -m - 1:-1]
    ref = logits - logits.max(-1, keepdims=True)
    ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    order = np.argsort(-ref, -1)[..., :3]
    np.testing.assert_array_equal(np.asarray(local.top_ids)[resp], order[resp])
    np.testing.assert_allclose(np.asarray(local.top_logprobs)[resp], np.take_along_axis(ref, order, -1)[resp], atol=1e-5)
    np.testing.assert_allclose(lp_local[resp], np.take_along_axis(ref, ids[:, -m:, None], -1)[..., 0][resp], atol=1e-5)


def test_openai_client_reads_transformers_logprobs(setup, server):
    import openai
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(setup / "teacher", dtype=torch.float32).eval()
    vocab = hf.config.vocab_size
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, vocab, n).tolist() for n in (5, 17, 2)]
    client = openai.OpenAI(base_url=server, api_key="unused")
    model = client.models.list().data[0].id
    batched = client.completions.create(model=model, prompt=prompts, max_tokens=1, echo=True, logprobs=1)
    single = client.completions.create(model=model, prompt=prompts[1], max_tokens=1, echo=True, logprobs=1,
                                       extra_body={"return_tokens_as_token_ids": True})
    scored_only = client.completions.create(model=model, prompt=prompts[0], max_tokens=0, echo=True, logprobs=0)
    assert len(batched.choices) == 3
    for p, choice in zip(prompts, batched.choices):
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([p])).logits[0].double(), -1).numpy()
        lp = choice.logprobs
        assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(p) + 1
        np.testing.assert_allclose(lp.token_logprobs[1:len(p)], ref[np.arange(len(p) - 1), p[1:]], atol=1e-4, rtol=0)
        # The one generated token is the greedy one, with its log-prob and top-1 entry.
        assert lp.token_logprobs[-1] == pytest.approx(ref[-1].max(), abs=1e-4)
        assert list(lp.top_logprobs[-1].values())[0] == pytest.approx(ref[-1].max(), abs=1e-4)
    with torch.no_grad():
        last = torch.log_softmax(hf(torch.tensor([prompts[1]])).logits[0, -1].double(), -1).numpy()
    toks = single.choices[0].logprobs.tokens
    assert toks == [f"token_id:{t}" for t in prompts[1]] + [f"token_id:{int(np.argmax(last))}"]
    assert single.choices[0].logprobs.token_logprobs[-1] == pytest.approx(last.max(), abs=1e-4)
    assert len(scored_only.choices[0].logprobs.token_logprobs) == len(prompts[0])


def test_malformed_requests_get_4xx_and_server_stays_up(server):
    url = server + "/completions"
    bad = [
        ("not json", dict(content=b"{prompt: [1, 2")),
        ("text prompt", dict(json={"prompt": "What is 2+2?", "max_tokens": 1, "echo": True, "logprobs": 1})),
        ("max_tokens 5", dict(json={"prompt": [1, 2, 3], "max_tokens": 5, "echo": True, "logprobs": 1})),
        ("id outside the vocabulary", dict(json={"prompt": [[1, 2], [3, 10 ** 9]], "max_tokens": 1, "echo": True})),
        ("logprobs 100", dict(json={"prompt": [1, 2], "max_tokens": 0, "echo": True, "logprobs": 100})),
        ("empty prompt", dict(json={"prompt": [], "max_tokens": 1})),
        ("nested too deep", dict(json={"prompt": [[[1]]], "max_tokens": 1})),
        ("streaming", dict(json={"prompt": [1, 2], "max_tokens": 1, "stream": True})),
        ("unknown model", dict(json={"model": "no-such-model", "prompt": [1, 2], "max_tokens": 1})),
        ("body not an object", dict(json=[1, 2, 3])),
    ]
    for name, kw in bad:
        r = httpx.post(url, timeout=60, **kw)
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        assert r.json()["error"]["message"], name
    assert httpx.get(server + "/no-such-route", timeout=10).status_code == 404
    assert httpx.get(server.removesuffix("/v1") + "/health", timeout=10).status_code == 200
    ok = httpx.post(url, json={"prompt": [1, 2, 3], "max_tokens": 0, "echo": True, "logprobs": 0}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["logprobs"]["token_logprobs"]) == 3


def test_vllm_prompt_logprobs_format_is_read():
    """A choice in vLLM's shape (prompt_logprobs keyed by token id) gives the same numbers as
    the legacy shape; a re-tokenised echo and text-keyed top log-probs are refused."""
    seq, start = [5, 9, 4, 7], 2
    lp = {1: -1.5, 2: -0.25, 3: -2.0}
    tops = {1: {9: -1.5, 11: -0.5}, 2: {4: -0.25, 8: -3.0}, 3: {7: -2.0, 1: -0.125}}
    vllm = {"index": 0, "prompt_logprobs": [None] + [
        {str(i): {"logprob": v, "rank": 1, "decoded_token": "x"} for i, v in tops[j].items()} for j in (1, 2, 3)]}
    legacy = {"index": 0, "logprobs": {
        "tokens": [f"token_id:{t}" for t in seq] + ["token_id:1"],
        "token_logprobs": [None, lp[1], lp[2], lp[3], -0.1],
        "top_logprobs": [None] + [{f"token_id:{i}": v for i, v in tops[j].items()} for j in (1, 2, 3)] + [{}]}}
    for choice in (vllm, legacy):
        got, ids, vals = teachers.parse_choice(choice, seq, start, 2, "test")
        np.testing.assert_array_equal(got, [lp[2], lp[3]])
        np.testing.assert_array_equal(ids, [[4, 8], [1, 7]])
        np.testing.assert_array_equal(vals, [[-0.25, -3.0], [-0.125, -2.0]])
    retok = json.loads(json.dumps(legacy))
    retok["logprobs"]["tokens"][1] = "token_id:10"
    with pytest.raises(teachers.TeacherError, match="re-tokenised"):
        teachers.parse_choice(retok, seq, start, 0, "test")
    text_keys = json.loads(json.dumps(legacy))
    text_keys["logprobs"]["top_logprobs"][2] = {"four": -0.25, "eight": -3.0}
    with pytest.raises(teachers.TeacherError, match="not a token id"):
        teachers.parse_choice(text_keys, seq, start, 2, "test")


# ------------------------------------------------------------------------------ SCOPE runs


def _cli(setup, workdir, *extra, steps=3):
    return [sys.executable, "-m", "tools.train", "--config", "configs/toy.py", "--config.algo=scope",
            f"--config.workdir={workdir}", "--config.toy_dir=", f"--config.student={setup / 'student'}",
            f"--config.teacher={setup / 'teacher'}", f"--config.data.train_files={setup / 'data' / 'train.jsonl'}",
            f"--config.num_steps={steps}", "--config.prompts_per_step=2", "--config.num_samples=4",
            "--config.sampling.max_new_tokens=8", "--config.verifier.num_workers=1",
            "--config.optim.warmup_steps=0", "--config.export=False", *extra]


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


KEYS = ("loss", "grad_norm", "wrong/teacher_ppl", "correct/student_ppl", "accuracy", "response_length")


def _assert_same_run(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key in KEYS:
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)


@pytest.fixture(scope="module")
def colocated_run(setup, tmp_path_factory):
    wd = tmp_path_factory.mktemp("colocated")
    subprocess.run(_cli(setup, wd), cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=600)
    return _metrics(wd)


@pytest.mark.slow
def test_scope_with_remote_teacher_equals_colocated(setup, server, colocated_run, tmp_path):
    # The teacher path is left pointing nowhere: a remote run must not load it.
    args = [a if not a.startswith("--config.teacher=") else "--config.teacher=/nonexistent" for a in _cli(setup, tmp_path)]
    subprocess.run(args + [f"--config.teacher_url={server}"], cwd=ROOT, env=_env(), check=True,
                   capture_output=True, timeout=600)
    remote = _metrics(tmp_path)
    assert len(remote) == 3 and any(r["wrong/teacher_ppl"] > 0 for r in remote)
    _assert_same_run(colocated_run, remote)


def test_remote_teacher_refuses_other_temperatures_and_kd():
    from configs import toy as toy_config
    from scope_jax import train

    for key, value, match in (("teacher_temperature", 0.5, "teacher_temperature"), ("algo", "kd", "kd")):
        cfg = toy_config.get_config()
        cfg.teacher_url = "http://127.0.0.1:9/v1"
        cfg[key] = value
        with pytest.raises(ValueError, match=match) as e:
            train._load_models(cfg, None)  # refused before any weights are read
        assert "teacher_url" in str(e.value)


@pytest.mark.slow
def test_server_killed_mid_run_retries_then_checkpoints(setup, colocated_run, tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}/v1"
    proc = _start_server(setup / "teacher", port, log_path=tmp_path / "server.log")
    wd = tmp_path / "run"
    args = _cli(setup, wd, f"--config.teacher_url={url}", "--config.teacher_client.retries=2",
                "--config.teacher_client.backoff_s=0.1", "--config.teacher_client.timeout_s=20",
                "--config.checkpoint_every=1000")
    run = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and run.poll() is None:
            if os.path.exists(wd / "metrics.jsonl") and _metrics(wd):
                break
            time.sleep(0.02)
        proc.kill()  # the server dies without a word
        proc.wait()
        _, err = run.communicate(timeout=300)
    finally:
        _stop(proc)
        if run.poll() is None:
            run.kill()
    done = len(_metrics(wd))
    assert done < 3, "the run finished before the server was killed; test is void"
    assert run.returncode != 0
    assert f"teacher server {url}" in err and "failed after 3 attempts" in err, err[-3000:]
    assert err.count("retrying in") >= 2, err[-3000:]
    assert f"checkpoint {done} in" in err
    assert sorted(int(s) for s in os.listdir(wd / "checkpoints") if s.isdigit()) == [done]

    proc = _start_server(setup / "teacher", port, log_path=tmp_path / "server.log")
    try:
        subprocess.run(args, cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=600)
    finally:
        _stop(proc)
    _assert_same_run(colocated_run, _metrics(wd))


# ------------------------------------------------------------------ pipelined collection


def test_chunks_assemble_into_the_batch_they_would_make_together(setup):
    """Two chunks with different prompt buckets and response lengths, assembled: each chunk's
    teacher log-probs (scored at its own shape) placed into the batch equal a direct scoring of
    the assembled batch; rows, masks, group ids and the shape metrics are the chunks'."""
    import jax

    from scope_jax import collect, sampling

    student, teacher = load_hf(setup / "student"), teachers.LocalTeacher(load_hf(setup / "teacher"))
    rng = np.random.default_rng(0)
    vocab, pad, ns, k = student.config.vocab_size, 0, 2, 2
    # chunk 0: short prompts (bucket 16), stops early on many EOS ids; chunk 1: bucket 32, no EOS.
    prompts = [[rng.integers(3, vocab, n).tolist() for n in lens] for lens in ((5, 9), (20, 3))]
    outs = [sampling.generate(student, p, num_samples=ns, max_new_tokens=24, temperature=1.0, pad_id=pad,
                              eos_ids=eos, key=jax.random.key(c))
            for c, (p, eos) in enumerate(zip(prompts, (list(range(3, vocab, 4)), None)))]
    cuts = [collect._trim_responses(o, 24)[0] for o in outs]
    widths = [(c.prompt_ids.shape[1], c.tokens.shape[1]) for c in cuts]
    assert widths[0][0] < widths[1][0] and widths[0][1] < widths[1][1], widths  # the case under test
    parts = [teacher.score(*sampling.full_sequences(c), c.tokens.shape[1]).logprobs for c in cuts]

    out, info = collect._trim_responses(collect.assemble_chunks(outs, k, pad), 24)
    ids, mask = sampling.full_sequences(out)
    m = out.tokens.shape[1]
    direct = np.asarray(teacher.score(ids, mask, m).logprobs)
    starts = np.cumsum([0] + [len(x) for x in parts])
    placed = collect.place_rows([(range(a, a + len(x)), x) for a, x in zip(starts, parts)],
                                int(starts[-1]), m)
    np.testing.assert_allclose(placed, direct, atol=1e-5, rtol=0)
    assert np.all(placed[~np.asarray(out.response_mask)] == 0)
    np.testing.assert_array_equal(np.asarray(out.group_ids), np.arange(2 * k * ns) // ns)
    ids, mask = np.asarray(ids), np.asarray(mask)
    chunk_rows = [r for c in cuts for r in zip(*map(np.asarray, sampling.full_sequences(c)))]
    for i, (cid, cmask) in enumerate(chunk_rows):  # the same real tokens, row by row
        np.testing.assert_array_equal(ids[i][mask[i]], cid[cmask])
    lengths = np.concatenate([np.asarray(o.lengths) for o in outs])
    prompt_lengths = np.concatenate([np.asarray(o.prompt_lengths) for o in outs])
    assert info["seq_len"] == ids.shape[1] == widths[1][0] + m
    assert info["padding"] == pytest.approx(1 - (lengths.sum() + prompt_lengths.sum()) / ids.size)


def _pipeline_run(setup, workdir, *, chunks, overlap, url="", engine="static"):
    """Two in-process SCOPE steps on the toy with config.pipeline and rollout.engine set;
    (metrics rows, export bytes)."""
    from configs import toy as toy_config
    from scope_jax import train

    cfg = toy_config.get_config()
    cfg.update_from_flattened_dict({
        "workdir": str(workdir), "toy_dir": "", "student": str(setup / "student"),
        "teacher": "" if url else str(setup / "teacher"), "teacher_url": url,
        "data.train_files": str(setup / "data" / "train.jsonl"), "num_steps": 2, "prompts_per_step": 4,
        "num_samples": 2, "sampling.max_new_tokens": 8, "verifier.num_workers": 1,
        "optim.warmup_steps": 0, "async_checkpointing": False, "pipeline.chunks": chunks,
        "pipeline.overlap": overlap, "rollout.engine": engine,
        # 8 rows through 2 slots: rows end (and stream out) in several blocks
        "rollout.slots": 2, "rollout.block": 4})
    train.train(cfg)
    with open(workdir / "export" / "model.safetensors", "rb") as f:
        return _metrics(workdir), f.read()


def _stage_free(row):
    return {k: v for k, v in row.items() if not k.startswith(("time", "critical/", "rollout")) and k != "rollouts_per_s"}


@pytest.mark.slow
def test_pipelined_collection_equals_serial(setup, server, tmp_path):
    """Static engine, chunks=2: overlap=True gives exactly the serial run's metrics and
    parameters with the co-located teacher. With the teacher on its server both orders agree
    to float rounding (the server gathers concurrent requests into batches by arrival, so its
    shapes vary) and agree with the co-located run, whose teacher scores the assembled batch in
    one pass."""
    serial, serial_params = _pipeline_run(setup, tmp_path / "serial", chunks=2, overlap=False)
    piped, piped_params = _pipeline_run(setup, tmp_path / "piped", chunks=2, overlap=True)
    assert [_stage_free(r) for r in piped] == [_stage_free(r) for r in serial]
    assert piped_params == serial_params
    for rows in (serial, piped):
        assert all(r["critical/score_teacher_s"] == pytest.approx(r["time/score_teacher_s"], rel=0.05, abs=0.05)
                   for r in rows)  # co-located: all of it on the critical path
    remote_serial, _ = _pipeline_run(setup, tmp_path / "remote_serial", chunks=2, overlap=False, url=server)
    remote_piped, _ = _pipeline_run(setup, tmp_path / "remote_piped", chunks=2, overlap=True, url=server)
    assert any(r["wrong/teacher_ppl"] > 0 for r in remote_piped)
    _assert_same_run(remote_serial, remote_piped)
    _assert_same_run(serial, remote_piped)
    for r in remote_piped:
        assert 0 <= r["critical/score_teacher_s"] and r["time/score_teacher_s"] > 0


@pytest.mark.slow
def test_continuous_engine_streams_rows_to_the_server_teacher(setup, server, tmp_path, monkeypatch):
    """rollout.engine=continuous: rows go to the verifier and the served teacher as they end,
    several parts per step while generation goes on; the run equals the co-located one (whose
    teacher scores the assembled batch in one pass) and the same streaming run in series, to
    float rounding."""
    from scope_jax import teacher as teacher_lib

    parts = []
    score_local = teacher_lib.RemoteTeacher.score_local

    def counted(self, ids, mask, m, **kw):
        parts.append(ids.shape[0])
        return score_local(self, ids, mask, m, **kw)

    monkeypatch.setattr(teacher_lib.RemoteTeacher, "score_local", counted)
    coloc, _ = _pipeline_run(setup, tmp_path / "coloc", chunks=1, overlap=True, engine="continuous")
    streamed, _ = _pipeline_run(setup, tmp_path / "streamed", chunks=1, overlap=True, url=server,
                                engine="continuous")
    assert len(parts) > 2 and sum(parts) == 2 * 4 * 2  # 2 steps x 4 prompts x 2 samples
    in_series, _ = _pipeline_run(setup, tmp_path / "series", chunks=1, overlap=False, url=server,
                                 engine="continuous")
    assert any(r["wrong/teacher_ppl"] > 0 for r in streamed)
    _assert_same_run(coloc, streamed)
    _assert_same_run(in_series, streamed)


# ------------------------------------------------------------ a served teacher's identity


@pytest.mark.slow
def test_a_served_teacher_is_fingerprinted_probed_and_a_changed_one_refused(setup, server, tmp_path):
    import shutil

    import torch
    import transformers
    from safetensors.numpy import load_file, save_file

    wd = tmp_path / "run"

    def args(url, *extra, steps=1, workdir=wd):
        return [a if not a.startswith("--config.teacher=") else "--config.teacher=/nonexistent"
                for a in _cli(setup, workdir, f"--config.teacher_url={url}", *extra, steps=steps)]

    r = subprocess.run(args(server), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    fp = json.load(open(wd / "config.json"))["teacher"]
    assert fp["served"] and fp["url"] == server and fp["max_model_len"] == 256
    # The probe's log-probs are the teacher's (transformers, float64 log-softmax).
    hf = transformers.AutoModelForCausalLM.from_pretrained(setup / "teacher", dtype=torch.float32).eval()
    ids = fp["probe_ids"]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1).numpy()
    np.testing.assert_allclose(fp["probe_logprobs"], ref[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)

    # The server restarted with other weights (same shapes, name and tokenizer): refused on resume.
    other = tmp_path / "other"
    shutil.copytree(setup / "teacher", other)
    tensors = load_file(str(other / "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.5
    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    port = _free_port()
    proc = _start_server(other, port, log_path=tmp_path / "server2.log")
    try:
        r = subprocess.run(args(f"http://127.0.0.1:{port}/v1", steps=2), cwd=ROOT, env=_env(), capture_output=True,
                           text=True, timeout=600)
    finally:
        _stop(proc)
    assert r.returncode != 0
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "config.json" in line and "teacher probe log-probs differ" in line, line
    assert len(_metrics(wd)) == 1

    # A student tokenizer that is not the server's: refused through the /tokenize probe.
    swapped, _ = swap_tokens(setup / "student", tmp_path / "swapped")
    r = subprocess.run(args(server, f"--config.tokenizer={swapped}", workdir=tmp_path / "tok"), cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    line = r.stderr.strip().splitlines()[-1]
    for w in ("tokenizer mismatch", f"teacher server {server}", "Cross-tokenizer distillation is not supported"):
        assert w in line, (w, line)
    assert not os.path.exists(tmp_path / "tok" / "config.json")


def test_server_tokenize_endpoint_and_vocab_size(setup, server):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(setup / "teacher")
    root = server.removesuffix("/v1")
    got = httpx.post(root + "/tokenize", json={"prompt": "12+30=42", "add_special_tokens": False}, timeout=60).json()
    assert got["tokens"] == tok.encode("12+30=42", add_special_tokens=False) and got["count"] == len(got["tokens"])
    assert httpx.get(server + "/models", timeout=60).json()["data"][0]["vocab_size"] == len(tok)
    assert httpx.post(root + "/tokenize", json={"prompt": [1, 2]}, timeout=60).status_code == 400
