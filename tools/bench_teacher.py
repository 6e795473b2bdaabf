"""Teacher scoring time: the server (tools.serve_teacher through RemoteTeacher) against the
co-located LocalTeacher, on one toy-shaped rollout batch, in one run.

    python -m tools.bench_teacher                      # a random toy-sized teacher (weights do not matter)
    python -m tools.bench_teacher --model runs/toy/teacher --repeats 7

Starts the server in a subprocess on a free local port, warms both paths up (compiles), then
times them in interleaved repeats and prints medians: the batch (rows x (prompt bucket +
response)), its latency and real tokens scored per second for each path, their ratio (remote /
co-located), and the latency of a one-sequence request. Server and client share this machine's
CPUs, so on a small machine the ratio includes their contention and the HTTP + JSON cost.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _toy_teacher(out: str) -> str:
    """A random teacher with the toy's shape and vocabulary (scope_jax.toy.TEACHER_SIZE)."""
    from flax import nnx

    from scope_jax import toy
    from scope_jax.models import Transformer, save_hf

    rows, _ = toy.split_examples(64, 8, seed=0)
    tok = toy.train_tokenizer(toy.tokenizer_corpus(rows))
    model = Transformer(toy.model_config(toy.TEACHER_SIZE, tok), rngs=nnx.Rngs(0))
    save_hf(model, out)
    return out


def _batch(vocab: int, rows: int, prompt_bucket: int, response: int, seed: int = 0):
    """Trainer-layout rows: left-padded prompts of random length, responses of random length."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (rows, prompt_bucket + response)).astype(np.int32)
    mask = np.zeros(ids.shape, bool)
    for i in range(rows):
        a, b = rng.integers(prompt_bucket // 4, prompt_bucket + 1), rng.integers(response // 4, response + 1)
        mask[i, prompt_bucket - a: prompt_bucket + b] = True
    return np.where(mask, ids, 0), mask


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="teacher checkpoint (default: a random toy-sized one)")
    p.add_argument("--rows", type=int, default=128, help="rollouts (the toy: 16 prompts x 8 samples)")
    p.add_argument("--prompt_bucket", type=int, default=64)
    p.add_argument("--response", type=int, default=48)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=16, help="RemoteTeacher sequences per request")
    p.add_argument("--max_concurrency", type=int, default=4)
    a = p.parse_args(argv)

    import httpx
    import jax

    from scope_jax import teacher as teachers
    from scope_jax.models import load_hf

    tmp = tempfile.mkdtemp(prefix="bench_teacher_")
    model_dir = a.model or _toy_teacher(os.path.join(tmp, "teacher"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(os.path.join(tmp, "server.log"), "wb")
    server = subprocess.Popen([sys.executable, "-m", "tools.serve_teacher", "--model", model_dir, "--port", str(port)],
                              cwd=ROOT, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the server did not start; see {log.name}") from None
                time.sleep(0.2)
        model = load_hf(model_dir)
        ids, mask = _batch(model.config.vocab_size, a.rows, a.prompt_bucket, a.response)
        local = teachers.LocalTeacher(model)
        remote = teachers.RemoteTeacher(url, batch_size=a.batch_size, max_concurrency=a.max_concurrency)
        one_ids, one_mask = ids[:1], mask[:1]

        def run_local():
            jax.block_until_ready(local.score(ids, mask, a.response).logprobs)

        def run_remote():
            jax.block_until_ready(remote.score(ids, mask, a.response).logprobs)

        def run_one():
            remote.score(one_ids, one_mask, a.response)

        fns = {"co_located": run_local, "remote": run_remote, "remote_one_sequence": run_one}
        for fn in fns.values():  # compile every bucket the timed calls use
            fn()
        times = {k: [] for k in fns}
        for _ in range(a.repeats):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        remote.close()
        med = {k: statistics.median(v) for k, v in times.items()}
        tokens = int(mask.sum())
        report = {
            "batch": {"rows": a.rows, "columns": a.prompt_bucket + a.response, "real_tokens": tokens},
            "median_s": {k: round(v, 4) for k, v in med.items()},
            "tokens_per_s": {k: round(tokens / med[k]) for k in ("co_located", "remote")},
            "remote_over_co_located": round(med["remote"] / med["co_located"], 2),
            "repeats": a.repeats, "devices": jax.device_count(), "model": a.model or "random toy-sized teacher",
        }
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
