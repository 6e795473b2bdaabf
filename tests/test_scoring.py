"""scope_jax.scoring: the token log-prob pass at a temperature, and lower_score of a packed config."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from scope_jax import losses, scoring
from scope_jax.models import ModelConfig, Transformer

ARCH = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=512, hidden_size=512,
            intermediate_size=512, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            head_dim=128, tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=10000.0)


def _reference_logprobs(hidden_bf16, lm_head_bf16, targets, temperature):
    """log softmax(h @ W / T)[target] in float64 numpy from the model's own bf16 values."""
    logits = np.asarray(hidden_bf16, np.float64) @ np.asarray(lm_head_bf16, np.float64) / temperature
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]


def test_bf16_logprobs_at_a_temperature_divide_the_float32_logits():
    """At T = 0.6 a bf16 model's response log-probs equal the float64 reference of its own bf16
    hidden states and lm_head; dividing the bf16 hidden states by T first (the old order)
    rounds every hidden unit and misses the reference by far more."""
    t = 0.6
    model = Transformer(ModelConfig.from_hf(ARCH), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                        rngs=nnx.Rngs(3))
    w = model.lm_head_weight()
    rng = np.random.default_rng(0)
    b, p, m = 4, 6, 10
    ids = jnp.asarray(rng.integers(1, ARCH["vocab_size"], (b, p + m)), jnp.int32)
    mask = jnp.ones((b, p + m), bool)
    got = np.asarray(scoring.response_logprobs(model, ids, mask, m, chunk_size=128, temperature=t))
    h = model.hidden(ids, attention_mask=mask)[:, p - 1: p - 1 + m]
    assert h.dtype == jnp.bfloat16 and w.dtype == jnp.bfloat16
    want = _reference_logprobs(jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32), ids[:, p:], t)
    new_err = np.abs(got - want)
    old = losses.token_logprobs(h / jnp.asarray(t, h.dtype), w, ids[:, p:], chunk_size=128)
    old_err = np.abs(np.asarray(old) - want)
    assert new_err.max() < 2e-5, new_err.max()
    assert old_err.mean() > 20 * new_err.mean() and old_err.max() > 1e-4, (old_err.mean(), new_err.mean())
