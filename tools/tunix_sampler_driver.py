"""google-tunix's sampler on a Hugging Face Qwen3 checkpoint, driven over stdin/stdout by
tools/bench_rollout.py (it runs in tunix's own venv, so it imports nothing of scope_jax).

    /work/tunix-venv/bin/python tools/tunix_sampler_driver.py --checkpoint DIR

Loads DIR (config.json + safetensors, written by transformers' save_pretrained) with
tunix.models.qwen3.params.create_model_from_safe_tensors, then answers one JSON request per
stdin line with one JSON line on stdout:

    {"prompts": [[ids], ...], "max_steps": M, "temperature": 0.0, "seed": 0, "tokens": false}
 -> {"seconds": wall time of the sampler call, "generated": rows x M tokens decoded,
     "tokens": [[M ids], ...] when asked}

Prompts are token ids: the driver's tokenizer maps "id id id" strings to ids and back (tunix's
Sampler takes strings). EOS is off (an id outside the vocabulary), so every row decodes M
tokens: tunix's sampler has one budget per call (max_generation_steps), not one per row.
An empty line ends the driver. Logs go to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


class IdTokenizer:
    """Space-separated token ids <-> ids; what tunix's TokenizerAdapter needs of a tokenizer.
    bos_id() is 0, which tunix's Sampler.tokenize reads as "no BOS": the prompt ids are fed as
    given, as to the other engines."""

    def __init__(self, pad: int):
        self._pad = pad

    def encode(self, text: str, **_) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, **_) -> str:
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self) -> int:
        return 0

    def eos_id(self) -> int:
        return -1  # never produced: EOS off

    def pad_id(self) -> int:
        return self._pad


def load(checkpoint: str):
    """(tunix Qwen3 model, its HF config dict) from a transformers Qwen3 checkpoint."""
    import jax.numpy as jnp
    from tunix.models.qwen3 import model as qwen3_model
    from tunix.models.qwen3 import params as qwen3_params

    with open(f"{checkpoint}/config.json") as f:
        hf = json.load(f)
    if hf.get("model_type") != "qwen3":
        raise ValueError(f"{checkpoint}: model_type {hf.get('model_type')!r}; this driver loads qwen3")
    theta = float(hf.get("rope_theta") or hf.get("rope_parameters", {}).get("rope_theta", 1e6))
    if theta != 1e6:  # tunix 0.1.7's qwen3 Attention calls apply_rope without the config's theta
        print(f"tunix driver: {checkpoint} has rope_theta {theta:g}, but tunix 0.1.7's Qwen3 "
              "always rotates with 1e6: its tokens will differ from the other engines'",
              file=sys.stderr, flush=True)
    cfg = qwen3_model.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"], hidden_dim=hf["intermediate_size"],
        num_heads=hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"],
        rope_theta=int(theta),
        norm_eps=hf["rms_norm_eps"], use_tied_embedding=bool(hf.get("tie_word_embeddings")),
        dtype=jnp.float32, param_dtype=jnp.float32)
    return qwen3_params.create_model_from_safe_tensors(checkpoint, cfg, dtype=jnp.float32), hf, cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    a = ap.parse_args()
    import jax
    import numpy as np
    from tunix.generate import sampler as sampler_lib

    model, hf, cfg = load(a.checkpoint)
    tok = IdTokenizer(pad=int(hf.get("pad_token_id") or 0))
    samplers = {}  # cache size -> Sampler (its KV cache size is fixed at construction)
    print(f"tunix driver ready: jax {jax.__version__} on {jax.default_backend()} "
          f"{jax.devices()[0].device_kind}", file=sys.stderr, flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        req = json.loads(line)
        prompts, m = req["prompts"], int(req["max_steps"])
        bucket = 1 << (max(len(p) for p in prompts) - 1).bit_length()  # tunix's own rule
        size = bucket + m
        if size not in samplers:
            samplers[size] = sampler_lib.Sampler(
                model, tok, sampler_lib.CacheConfig(cache_size=size, num_layers=cfg.num_layers,
                                                    num_kv_heads=cfg.num_kv_heads,
                                                    head_dim=cfg.head_dim))
        temp = float(req.get("temperature", 0.0))
        sample = dict(temperature=temp, top_p=1.0, seed=int(req.get("seed", 0))) if temp > 0 else {}
        t0 = time.perf_counter()
        out = samplers[size]([" ".join(map(str, p)) for p in prompts], max_generation_steps=m,
                             max_prompt_length=bucket, eos_tokens=[-1], echo=False,
                             pad_output=True, **sample)
        toks = [list(map(int, t)) for t in out.tokens]  # host ints: the call has finished
        seconds = time.perf_counter() - t0
        reply = {"seconds": seconds, "generated": int(sum(len(t) for t in toks))}
        if req.get("tokens"):
            reply["tokens"] = [np.asarray(t)[:m].tolist() for t in toks]
        try:
            print(json.dumps(reply), flush=True)
        except BrokenPipeError:  # the bench process is gone: nothing to answer
            print("tunix driver: the bench closed the pipe; exiting", file=sys.stderr)
            return


if __name__ == "__main__":
    main()
