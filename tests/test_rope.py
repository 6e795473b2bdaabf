"""RoPE scaling (linear, dynamic, yarn, llama3) against transformers 5 on tiny random checkpoints.

Each case is long enough that the scaling matters (past original_max_position_embeddings, or
past max_position_embeddings for dynamic), and a model with the same weights and plain RoPE is
checked to DIFFER from transformers there, so the parity checks can fail.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from scope_jax.models import ModelConfig, Transformer, load_hf, save_hf
from scope_jax.models.model import rope_cos_sin, rope_inv_freq
from tests.tiny_hf import make_tiny_checkpoint

ATOL = 1e-4
VOCAB = 160

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
# (family, config overrides, legacy): legacy=True rewrites config.json the pre-5 way, a
# top-level rope_theta and rope_scaling = {"type": ...} without rope_parameters.
CASES = {
    "llama-llama3": ("llama", dict(rope_parameters={**LLAMA3, "rope_theta": 500.0}), False),
    "llama-llama3-legacy": ("llama", dict(rope_parameters={**LLAMA3, "rope_theta": 1e4}), True),
    "llama-linear-legacy": ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                            "rope_theta": 1e4}), True),
    "llama-dynamic": ("llama", dict(max_position_embeddings=64, rope_parameters={
        "rope_type": "dynamic", "factor": 3.0, "rope_theta": 1e4}), False),
    "qwen3-yarn": ("qwen3", dict(max_position_embeddings=128, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
        "rope_theta": 1e4}), False),
    # every yarn option: betas, untruncated ramp, mscale / mscale_all_dim attention factor
    "qwen2-yarn-options-legacy": ("qwen2", dict(max_position_embeddings=128, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 16, "beta_slow": 2, "truncate": False, "mscale": 0.9,
        "mscale_all_dim": 0.5, "rope_theta": 2e4}), True),
    "qwen3-yarn-attention-factor": ("qwen3", dict(max_position_embeddings=128, rope_parameters={
        "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 48,
        "attention_factor": 1.3, "rope_theta": 1e4}), False),
}


def _to_legacy(path):
    """Rewrites path/config.json with rope_scaling {"type": ...} and a top-level rope_theta."""
    cfg = json.load(open(path / "config.json"))
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    cfg["rope_scaling"] = rope
    json.dump(cfg, open(path / "config.json", "w"))


def _hf(path):
    """A fresh transformers model: dynamic RoPE keeps state across calls, so never reuse one."""
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _hf_logits(hf_model, ids, attention_mask=None, position_ids=None):
    kw = {}
    if attention_mask is not None:
        kw["attention_mask"] = torch.tensor(np.asarray(attention_mask), dtype=torch.long)
    if position_ids is not None:
        kw["position_ids"] = torch.tensor(np.asarray(position_ids), dtype=torch.long)
    with torch.no_grad():
        return hf_model(torch.tensor(np.asarray(ids), dtype=torch.long), **kw).logits.numpy()


def _ids(shape, seed=0):
    return np.random.RandomState(seed).randint(3, VOCAB, shape).astype(np.int32)


def _long_len(cfg: ModelConfig) -> int:
    """A length past where the scaling starts to matter."""
    p = dict(cfg.rope_scaling)
    return int(1.5 * p.get("original_max_position_embeddings", cfg.max_position_embeddings)) + 3


def _unscaled(model: Transformer) -> Transformer:
    """The same weights with plain RoPE."""
    plain = Transformer(dataclasses.replace(model.config, rope_scaling=()), rngs=nnx.Rngs(0))
    nnx.update(plain, nnx.state(model))
    return plain


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(case name, checkpoint path, scope_jax model from load_hf)."""
    family, overrides, legacy = CASES[request.param]
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), family, **overrides)
    if legacy:
        _to_legacy(path)
    return request.param, path, load_hf(path)


def test_config_reads_the_scaling(case):
    name, _, model = case
    expected = dict(CASES[name][1]["rope_parameters"])
    assert model.config.rope_theta == expected.pop("rope_theta")
    assert dict(model.config.rope_scaling) == expected
    hash(model.config)  # lives in the NNX graphdef


def test_rope_tables_match_transformers_rotary_embedding(case):
    """inv_freq and cos / sin equal transformers' rotary module, short and long positions.

    numpy's and torch's float32 pow differ in the last bit or two, so inv_freq is compared to
    4 ulps and the tables to that error times the largest position (an angle error).
    """
    _, path, model = case
    c = model.config
    rotary = _hf(path).model.rotary_emb
    inv_freq, factor = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling,
                                     c.max_position_embeddings)
    np.testing.assert_allclose(inv_freq, rotary.inv_freq.numpy(), rtol=5e-7, atol=0)
    assert factor == pytest.approx(rotary.attention_scaling, rel=1e-12)
    for length in (c.max_position_embeddings // 2, _long_len(c), c.max_position_embeddings + 9):
        positions = np.stack([np.arange(length), np.maximum(np.arange(length) - 5, 0)])
        rotary = _hf(path).model.rotary_emb  # fresh: dynamic keeps the longest length seen
        with torch.no_grad():
            ref_cos, ref_sin = rotary(torch.zeros(1, dtype=torch.float32),
                                      torch.tensor(positions, dtype=torch.long))
        cos, sin = rope_cos_sin(jnp.asarray(positions), c.head_dim, c.rope_theta, jnp.float32,
                                c.rope_scaling, c.max_position_embeddings)
        atol = 1e-6 + 5e-7 * length
        np.testing.assert_allclose(np.asarray(cos), ref_cos.numpy(), atol=atol, rtol=0)
        np.testing.assert_allclose(np.asarray(sin), ref_sin.numpy(), atol=atol, rtol=0)


def test_long_logits_match_transformers_and_differ_unscaled(case):
    _, path, model = case
    ids = _ids((2, _long_len(model.config)), seed=1)
    ref = _hf_logits(_hf(path), ids)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), ref, atol=ATOL, rtol=0)
    plain = np.asarray(_unscaled(model)(jnp.asarray(ids)))
    assert np.abs(plain - ref).max() > 100 * ATOL  # the scaling matters here


def test_padded_batch_matches_transformers(case):
    """Left-padded rows past the scaling threshold, positions cumsum(mask) - 1."""
    _, path, model = case
    t = _long_len(model.config) + 4
    ids = _ids((2, t), seed=2)
    mask = np.ones((2, t), np.int32)
    mask[0, :7] = 0
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    ref = _hf_logits(_hf(path), ids, mask, positions)
    out = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(out[mask == 1], ref[mask == 1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("layout", ["cache", "decode_cache"])
def test_cached_decode_matches_transformers_cache(case, layout):
    """Prefill, then decode steps that cross the scaling threshold, each step against
    transformers' own cached forward (one fresh model for the whole sequence, as generate)."""
    _, path, model = case
    c = model.config
    threshold = dict(c.rope_scaling).get("original_max_position_embeddings",
                                         c.max_position_embeddings)
    prefill, steps = threshold - 2, 5
    ids = _ids((1, prefill + steps), seed=3)
    hf = _hf(path)
    with torch.no_grad():
        out = hf(torch.tensor(ids[:, :prefill], dtype=torch.long), use_cache=True)
        refs, past = [out.logits.numpy()[0]], out.cache
        for t in range(prefill, prefill + steps):
            out = hf(torch.tensor(ids[:, t:t + 1], dtype=torch.long), cache=past,
                     use_cache=True)
            refs.append(out.logits.numpy()[0])
            past = out.cache
    s = prefill + steps
    cache = model.init_cache(1, s) if layout == "cache" else model.init_decode_cache(1, s)
    kv_mask = np.zeros((1, s), bool)
    kv_mask[:, :prefill] = True
    step = nnx.jit(lambda m, *a: m.forward_cached(*a))
    logits, cache = step(model, jnp.asarray(ids[:, :prefill]),
                         jnp.arange(prefill, dtype=jnp.int32)[None], cache, 0, jnp.asarray(kv_mask))
    np.testing.assert_allclose(np.asarray(logits[0]), refs[0], atol=ATOL, rtol=0)
    for i, t in enumerate(range(prefill, prefill + steps)):
        kv_mask[:, t] = True
        logits, cache = step(model, jnp.asarray(ids[:, t:t + 1]), jnp.full((1, 1), t, jnp.int32),
                             cache, jnp.int32(t), jnp.asarray(kv_mask))
        np.testing.assert_allclose(np.asarray(logits[0]), refs[i + 1], atol=ATOL, rtol=0,
                                   err_msg=f"decode step at position {t}")


def test_dynamic_is_plain_rope_up_to_max_positions(tmp_path):
    """Dynamic NTK changes nothing while max(positions) + 1 <= max_position_embeddings."""
    path = make_tiny_checkpoint(tmp_path / "dyn", "llama", max_position_embeddings=32,
                                rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    model = load_hf(path)
    ids = _ids((1, 32), seed=4)
    np.testing.assert_array_equal(np.asarray(model(jnp.asarray(ids))),
                                  np.asarray(_unscaled(model)(jnp.asarray(ids))))
    longer = _ids((1, 33), seed=4)
    assert np.abs(np.asarray(model(jnp.asarray(longer)))
                  - np.asarray(_unscaled(model)(jnp.asarray(longer)))).max() > 100 * ATOL


def test_save_hf_round_trip_keeps_the_scaling(case, tmp_path):
    _, path, model = case
    out = save_hf(model, tmp_path / "saved")
    assert ModelConfig.from_pretrained(out) == model.config
    again = _hf(out)
    original = _hf(path)
    assert {k: v for k, v in again.config.rope_parameters.items() if k != "type"} == {
        k: v for k, v in original.config.rope_parameters.items() if k != "type"}
    ids = _ids((1, _long_len(model.config)), seed=5)
    np.testing.assert_allclose(_hf_logits(again, ids), _hf_logits(original, ids), atol=1e-6,
                               rtol=0)


def test_top_level_original_max_position_embeddings_wins(tmp_path):
    """As transformers: a top-level original_max_position_embeddings overrides the dict's."""
    path = make_tiny_checkpoint(tmp_path / "top", "llama", max_position_embeddings=128,
                                rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 64})
    cfg = json.load(open(path / "config.json"))
    cfg["original_max_position_embeddings"] = 24
    json.dump(cfg, open(path / "config.json", "w"))
    model = load_hf(path)
    assert dict(model.config.rope_scaling)["original_max_position_embeddings"] == 24
    hf = _hf(path)
    assert hf.config.rope_parameters["original_max_position_embeddings"] == 24
    ids = _ids((1, 40), seed=6)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), _hf_logits(hf, ids),
                               atol=ATOL, rtol=0)


def test_missing_original_max_position_embeddings_defaults_to_max_positions(tmp_path):
    """llama3 / yarn without original_max_position_embeddings: transformers uses
    max_position_embeddings."""
    path = make_tiny_checkpoint(tmp_path / "def", "qwen3", max_position_embeddings=40,
                                rope_parameters={"rope_type": "yarn", "factor": 4.0})
    cfg = json.load(open(path / "config.json"))
    cfg["rope_parameters"].pop("original_max_position_embeddings", None)
    json.dump(cfg, open(path / "config.json", "w"))
    model = load_hf(path)
    assert dict(model.config.rope_scaling)["original_max_position_embeddings"] == 40
    ids = _ids((1, 50), seed=7)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), _hf_logits(_hf(path), ids),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("rope, error, match", [
    ({"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
      "original_max_position_embeddings": 32}, NotImplementedError,
     r"config\.json: rope_type 'longrope' is not implemented"),
    ({"type": "linear"}, ValueError, r"config\.json: rope_scaling\['factor'\] is required"),
    ({"type": "dynamic", "factor": None}, ValueError, r"rope_scaling\['factor'\]"),
    ({"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}, ValueError,
     r"rope_scaling\['high_freq_factor'\]"),
    ({"type": "yarn", "factor": "4"}, ValueError, r"rope_scaling\['factor'\] must be a number"),
    ({"type": "yarn", "factor": 4.0, "partial_rotary_factor": 0.5}, NotImplementedError,
     "partial_rotary_factor"),
])
def test_config_errors_name_file_and_field(tmp_path, rope, error, match):
    path = make_tiny_checkpoint(tmp_path / "bad", "llama")
    cfg = json.load(open(path / "config.json"))
    cfg["rope_scaling"] = rope
    json.dump(cfg, open(path / "config.json", "w"))
    with pytest.raises(error, match=match):
        ModelConfig.from_pretrained(path)
