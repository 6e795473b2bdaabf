"""Check a local Hugging Face checkpoint: load it, describe its parameters, greedy-continue a prompt.

    python -m tools.check_checkpoint PATH --prompt-ids 1,2,3 --max-new-tokens 8
    python -m tools.check_checkpoint PATH --prompt "2 + 2 =" --mesh fsdp=2,tensor=4 --dtype bfloat16

--prompt needs PATH/tokenizer.json (read with the `tokenizers` library).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scope_jax import sharding as shd
from scope_jax.models import load_hf
from scope_jax.models.hf import CheckpointError, check_finite


def greedy_continue(model, prompt_ids: list[int], max_new_tokens: int,
                    eos_ids: tuple[int, ...] = ()) -> list[int]:
    """Greedy decoding of one prompt through the KV cache (prefill, then one token per step).

    Args:
      model: scope_jax Transformer.
      prompt_ids: the prompt's token ids (non-empty).
      max_new_tokens: how many tokens to generate at most; stops early after an id in eos_ids.
    Returns:
      The generated ids (without the prompt).
    """
    if not prompt_ids:
        raise ValueError("empty prompt")
    graphdef, state = nnx.split(model)
    t = len(prompt_ids)
    cache = model.init_cache(1, t + max_new_tokens)
    kv_mask = jnp.zeros((1, t + max_new_tokens), bool)

    @jax.jit
    def step(state, ids, positions, cache, index, kv_mask):
        logits, cache = nnx.merge(graphdef, state).forward_cached(ids, positions, cache, index,
                                                                  kv_mask)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    ids = jnp.asarray([prompt_ids], jnp.int32)
    kv_mask = kv_mask.at[:, :t].set(True)
    nxt, cache = step(state, ids, jnp.arange(t, dtype=jnp.int32)[None], cache, 0, kv_mask)
    out = []
    for i in range(max_new_tokens):
        token = int(nxt[0])
        out.append(token)
        if token in eos_ids or i == max_new_tokens - 1:
            break
        pos = t + i
        kv_mask = kv_mask.at[:, pos].set(True)
        nxt, cache = step(state, nxt[:, None], jnp.full((1, 1), pos, jnp.int32), cache, pos,
                          kv_mask)
    return out


def describe(model) -> str:
    """Parameter count, dtype histogram and one line per parameter (path, shape, dtype, sharding).

    Shapes are scope_jax's: kernels are [in, out], the transpose of the checkpoint's weight.
    """
    lines, total, dtypes = [], 0, collections.Counter()
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        x = var.get_value()
        total += x.size
        dtypes[str(x.dtype)] += x.size
        spec = getattr(x.sharding, "spec", None)
        lines.append(f"  {'.'.join(map(str, path)):<40} {str(tuple(x.shape)):<16} {x.dtype} "
                     f"{spec if spec is not None else x.sharding}")
    head = [f"parameters: {total:,} ({total / 1e9:.3f} B)",
            "dtypes: " + ", ".join(f"{k}: {v:,}" for k, v in sorted(dtypes.items()))]
    return "\n".join(head + lines)


def _mesh(text: str | None):
    try:
        return shd.mesh_from_flag(text)
    except ValueError as e:
        raise SystemExit(f"--mesh: {e}") from None


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("path", help="checkpoint directory (config.json + *.safetensors)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    group.add_argument("--prompt", help="text, tokenized with PATH/tokenizer.json")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--mesh", help="mesh sizes, e.g. fsdp=2,tensor=4 (default: one device)")
    args = ap.parse_args(argv)

    dtype = jnp.dtype(args.dtype)
    start = time.time()
    model = load_hf(args.path, dtype=dtype, mesh=_mesh(args.mesh))
    print(f"loaded {args.path} in {time.time() - start:.1f}s: {model.config}")
    print(describe(model))
    try:
        check_finite(model, args.path)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    tokenizer = None
    if args.prompt is not None:
        file = os.path.join(args.path, "tokenizer.json")
        if not os.path.exists(file):
            raise SystemExit(f"--prompt needs {file}; use --prompt-ids instead")
        import tokenizers

        tokenizer = tokenizers.Tokenizer.from_file(file)
        prompt = tokenizer.encode(args.prompt).ids
    elif args.prompt_ids is not None:
        try:
            prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise SystemExit(f"--prompt-ids: not a comma-separated list of ints: {args.prompt_ids!r}")
    else:
        bos = model.config.bos_token_id
        prompt = [bos if bos is not None else 0]
    bad = [t for t in prompt if not 0 <= t < model.config.vocab_size]
    if bad:
        raise SystemExit(f"prompt ids {bad} are outside the vocabulary [0, {model.config.vocab_size})")
    from scope_jax.sampling import stop_ids

    eos = tuple(stop_ids(model.config, tokenizer, checkpoint=args.path))  # the one stop rule
    start = time.time()
    new = greedy_continue(model, prompt, args.max_new_tokens, eos)
    print(f"prompt ids: {prompt}")
    print(f"greedy ids: {new}  ({time.time() - start:.1f}s incl. compile)")
    if tokenizer is not None:
        print(f"greedy text: {tokenizer.decode(new)!r}")
    logits = np.asarray(model(jnp.asarray([prompt + new], jnp.int32)))
    print(f"logits finite: {bool(np.isfinite(logits).all())}, max |logit|: {np.abs(logits).max():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
