"""Tiny random Hugging Face checkpoints for tests (transformers + torch, CPU, float32, seeded).

    make_tiny_checkpoint(tmp_path / "ckpt", "qwen3", tie_word_embeddings=True)
"""

from __future__ import annotations

import os

# Small but non-trivial: GQA (4 query heads over 2 KV heads), head_dim 16, 2 layers.
_BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)

FAMILIES = ("qwen2", "qwen3", "llama")


def tiny_config(family: str, **overrides):
    """A transformers config object for ``family`` with the tiny defaults and ``overrides``."""
    import transformers

    cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
           "llama": transformers.LlamaConfig}[family]
    kw = dict(_BASE)
    if family in ("qwen3", "llama"):
        kw["head_dim"] = kw["hidden_size"] // kw["num_attention_heads"]
    kw.update(overrides)
    return cls(**kw)


def make_tiny_model(family: str, seed: int = 0, **overrides):
    """A tiny random transformers CausalLM (float32, eval mode) of ``family``.

    Norm weights and biases are randomised too (transformers initialises them to 1 / 0, which
    would hide a missing norm or bias).
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model.eval()


def make_tiny_checkpoint(path, family: str, seed: int = 0, max_shard_size=None, **overrides):
    """Saves a tiny random ``family`` model with save_pretrained (safetensors) and returns path.

    Args:
      path: output directory.
      family: 'qwen2' | 'qwen3' | 'llama'.
      seed: torch seed for the weights.
      max_shard_size: e.g. "20KB" to force a multi-file checkpoint with an index json.
      **overrides: transformers config fields (tie_word_embeddings, rope_theta, ...).
    """
    model = make_tiny_model(family, seed, **overrides)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(os.fspath(path), safe_serialization=True, **kw)
    return path


def make_toy_setup(out, teacher_family: str = "qwen3", teacher_tied: bool = True):
    """Toy data (64 training problems) and a toy tokenizer in ``out``, with two tiny random
    checkpoints that use it: out/student (Qwen3, tied) and out/teacher (``teacher_family``).
    Returns ``out``."""
    from scope_jax import data, toy

    train_rows, _ = toy.split_examples(64, 8, seed=0)
    data.write_jsonl(out / "data" / "train.jsonl", train_rows)
    tok = toy.train_tokenizer(toy.tokenizer_corpus(train_rows))
    assert len(tok) > 200
    for name, family, seed, tied in (("student", "qwen3", 0, True), ("teacher", teacher_family, 1, teacher_tied)):
        make_tiny_checkpoint(out / name, family, seed=seed, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=tied)
        tok.save_pretrained(out / name)
    return out


def swap_tokens(src, dst):
    """A copy of checkpoint directory `src` whose tokenizer.json gives two vocabulary entries
    each other's ids (same size, another mapping); returns (dst, (token a, token b))."""
    import json
    import shutil

    shutil.copytree(src, dst)
    with open(os.path.join(dst, "tokenizer.json")) as f:
        tj = json.load(f)
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[40:42]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    with open(os.path.join(dst, "tokenizer.json"), "w") as f:
        json.dump(tj, f)
    return dst, (a, b)


def run_two_processes(args, cwd, env) -> None:
    """Runs `args` as 2 local JAX processes (process ids 0 and 1, a free coordinator port, the
    caller's `env` otherwise) and asserts both exit 0, showing their stderr tails if not."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # No persistent compilation cache (tests/conftest.py turns it on for every process): only
    # process 0 writes it, and process 1's keys differ, so with a warm cache process 0 ran loaded
    # executables while process 1 compiled afresh, and their CPU (gloo) collectives did not pair
    # up ("Received data size doesn't match expected size. 2048 vs 8", then a heartbeat timeout):
    # test_train's two-process run failed 3 of 3 times on a second `make test`, passed 1 of 1
    # with the cache off (2026-12-07, 2-core dev machine).
    procs = [subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**env, "JAX_ENABLE_COMPILATION_CACHE": "false",
                                   "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                   "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid)})
             for pid in range(2)]
    try:
        errs = [p.communicate(timeout=600)[1].decode() for p in procs]
    finally:  # a process whose peer died waits on collectives forever: never leave it behind
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errs)
