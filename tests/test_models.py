"""scope_jax.models and scope_jax.sharding against transformers (PyTorch, CPU, float32).

Every reference value comes from transformers' own forward pass on the same tiny random
checkpoint (tests/tiny_hf.py), never from scope_jax itself.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import load_file, save_file

from scope_jax import sharding as shd
from scope_jax.models import (Cache, CheckpointError, DecodeCache, ModelConfig, Transformer, load_hf,
                              save_hf)
from tests.tiny_hf import make_tiny_checkpoint, make_tiny_model
from tools.check_checkpoint import greedy_continue
from tools.check_checkpoint import main as check_main

ATOL = 1e-4
VOCAB = 160

# (family, config overrides): GQA 4:2 by default, MQA, MHA, tied / untied, non-default
# rope_theta, explicit head_dim != hidden / heads, attention / MLP biases, rms_norm_eps.
CASES = {
    "qwen2-untied-theta5e3": ("qwen2", dict(rope_theta=5000.0)),
    "qwen2-tied-mqa": ("qwen2", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "qwen3-tied-theta1e6": ("qwen3", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3-untied-headdim24-bias": ("qwen3", dict(head_dim=24, rope_theta=3e4,
                                                  attention_bias=True, rms_norm_eps=1e-5)),
    "llama-untied-bias-theta5e5": ("llama", dict(rope_theta=5e5, attention_bias=True,
                                                 mlp_bias=True)),
    "llama-tied-mha": ("llama", dict(tie_word_embeddings=True, num_key_value_heads=4)),
}


def _hf_logits(hf_model, ids, attention_mask=None, position_ids=None):
    with torch.no_grad():
        kw = {}
        if attention_mask is not None:
            kw["attention_mask"] = torch.tensor(np.asarray(attention_mask), dtype=torch.long)
        if position_ids is not None:
            kw["position_ids"] = torch.tensor(np.asarray(position_ids), dtype=torch.long)
        return hf_model(torch.tensor(np.asarray(ids), dtype=torch.long), **kw).logits.numpy()


def _ids(shape, seed=0):
    return np.random.RandomState(seed).randint(3, VOCAB, shape).astype(np.int32)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(checkpoint path, transformers model loaded from it, scope_jax model from load_hf)."""
    family, overrides = CASES[request.param]
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), family, **overrides)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf, load_hf(path)


@pytest.fixture(scope="module")
def qwen2_path(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2", rope_theta=2e4)


def test_logits_and_hidden_match_transformers(case):
    path, hf, model = case
    ids = _ids((2, 11))
    logits = model(jnp.asarray(ids))
    assert logits.dtype == jnp.float32 and logits.shape == (2, 11, VOCAB)
    np.testing.assert_allclose(np.asarray(logits), _hf_logits(hf, ids), atol=ATOL, rtol=0)
    # hidden() is the final-norm hidden state; hidden @ lm_head_weight() gives the logits.
    with torch.no_grad():
        ref_h = hf(torch.tensor(ids, dtype=torch.long), output_hidden_states=True)
    h = model.hidden(jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(h), ref_h.hidden_states[-1].numpy(), atol=ATOL, rtol=0)
    w = model.lm_head_weight()
    assert w.shape == (model.config.hidden_size, VOCAB)
    np.testing.assert_allclose(np.asarray(h @ w), ref_h.logits.numpy(), atol=ATOL, rtol=0)


def test_padded_batch_matches_transformers(case):
    """Left- and right-padded rows: real positions match transformers on the same mask."""
    _, hf, model = case
    ids = _ids((3, 9), seed=1)
    mask = np.ones((3, 9), np.int32)
    mask[0, :4] = 0  # left padding
    mask[1, 6:] = 0  # right padding
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    ref = _hf_logits(hf, ids, mask, positions)
    # default positions with a mask are cumsum(mask) - 1
    out = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=ATOL, rtol=0)
    # each row equals the unpadded row run alone through transformers
    for b in range(3):
        alone = _hf_logits(hf, ids[b:b + 1, real[b]])[0]
        np.testing.assert_allclose(out[b, real[b]], alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("layout", ["cache", "decode_cache"])
def test_forward_cached_prefill_and_decode(case, layout):
    """Left-padded prompts of different lengths, then decode steps, through a jitted, donated
    step: each step's logits equal transformers' full forward over the unpadded prefix. Both
    cache layouts (Cache, and the sampler's per-layer DecodeCache) must give them."""
    _, hf, model = case
    lengths, bucket, steps = [5, 8], 8, 3
    prompts = [_ids((n,), seed=10 + n) for n in lengths]
    cont = _ids((2, steps), seed=3)
    b, s = len(lengths), bucket + steps
    ids = np.zeros((b, bucket), np.int32)
    kv_mask = np.zeros((b, s), bool)
    positions = np.zeros((b, bucket), np.int32)
    for i, p in enumerate(prompts):
        ids[i, bucket - len(p):] = p
        kv_mask[i, bucket - len(p):bucket] = True
        positions[i, bucket - len(p):] = np.arange(len(p))
    graphdef, state = nnx.split(model)

    def step(state, ids, positions, cache, index, kv_mask):
        return nnx.merge(graphdef, state).forward_cached(ids, positions, cache, index, kv_mask)

    step = jax.jit(step, donate_argnums=(3,))
    cfg = model.config
    if layout == "cache":
        cache = model.init_cache(b, s)
        assert isinstance(cache, Cache) and cache.k.shape == (
            cfg.num_layers, b, s, cfg.num_kv_heads, cfg.head_dim)
    else:
        cache = model.init_decode_cache(b, s)
        assert isinstance(cache, DecodeCache) and len(cache.k) == cfg.num_layers
        assert cache.k[0].shape == (cfg.num_kv_heads, b, cfg.head_dim, s)
    logits, cache = step(state, jnp.asarray(ids), jnp.asarray(positions), cache, 0,
                         jnp.asarray(kv_mask))
    for i, p in enumerate(prompts):
        ref = _hf_logits(hf, p[None])[0]
        np.testing.assert_allclose(np.asarray(logits[i, bucket - len(p):]), ref, atol=ATOL, rtol=0)
    for t in range(steps):
        kv_mask[:, bucket + t] = True
        pos = np.asarray([[n + t] for n in lengths], np.int32)
        logits, cache = step(state, jnp.asarray(cont[:, t:t + 1]), jnp.asarray(pos), cache,
                             jnp.int32(bucket + t), jnp.asarray(kv_mask))
        assert logits.shape == (b, 1, VOCAB)
        assert isinstance(cache, Cache if layout == "cache" else DecodeCache)
        for i, p in enumerate(prompts):
            ref = _hf_logits(hf, np.concatenate([p, cont[i, :t + 1]])[None])[0, -1]
            np.testing.assert_allclose(np.asarray(logits[i, 0]), ref, atol=ATOL, rtol=0)


def test_save_hf_round_trip_through_transformers(case, tmp_path):
    path, hf, model = case
    out = save_hf(model, tmp_path / "saved", max_shard_bytes=40_000)  # forces several files
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors")
                                                           for f in files) > 1
    again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _ids((2, 7), seed=4)
    np.testing.assert_allclose(_hf_logits(again, ids), _hf_logits(hf, ids), atol=1e-6, rtol=0)
    for name, p in hf.state_dict().items():  # exact tensor round trip
        np.testing.assert_array_equal(again.state_dict()[name].numpy(), p.numpy(), err_msg=name)
    assert ModelConfig.from_pretrained(out) == model.config
    copied = save_hf(model, tmp_path / "copied", copy_files_from=path)
    assert sorted(os.listdir(copied)) == ["config.json", "generation_config.json",
                                          "model.safetensors"]


def test_chunked_attention_matches_transformers(qwen2_path):
    """Query-chunked attention (chunk 4, T = 11 not a multiple) equals transformers, padded
    or through the cache, and its gradient equals the unchunked one."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(qwen2_path, dtype=torch.float32).eval()
    chunked = load_hf(qwen2_path, attention_chunk=4)
    whole = load_hf(qwen2_path, attention_chunk=None)
    ids = _ids((2, 11), seed=11)
    mask = np.ones((2, 11), np.int32)
    mask[0, :3] = 0
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    ref = _hf_logits(hf, ids, mask, positions)
    out = np.asarray(chunked(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(out[mask == 1], ref[mask == 1], atol=ATOL, rtol=0)
    cache = chunked.init_cache(2, 12)
    kv_mask = np.pad(mask.astype(bool), ((0, 0), (0, 1)))
    logits, _ = chunked.forward_cached(jnp.asarray(ids), jnp.asarray(positions), cache, 0,
                                       jnp.asarray(kv_mask))
    np.testing.assert_allclose(np.asarray(logits)[mask == 1], ref[mask == 1], atol=ATOL, rtol=0)

    def grad(model):
        return nnx.jit(nnx.grad(lambda m: (m(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
                                           * jnp.asarray(mask)[..., None]).sum()))(model)

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4),
                 grad(chunked), grad(whole))


def test_bfloat16_params_save_and_compute(qwen2_path, tmp_path):
    """bf16 storage round-trips bit-exactly to torch's bf16 rounding; bf16 compute is close."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(qwen2_path, dtype=torch.float32)
    model = load_hf(qwen2_path, dtype=jnp.bfloat16)
    assert model.embed_tokens[...].dtype == jnp.bfloat16
    out = save_hf(model, tmp_path / "bf16")
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    again = load_file(os.path.join(out, "model.safetensors"))
    for name, p in hf.state_dict().items():
        assert again[name].dtype == torch.bfloat16, name
        np.testing.assert_array_equal(again[name].float().numpy(), p.bfloat16().float().numpy(),
                                      err_msg=name)
    ids = _ids((2, 10), seed=5)
    logits = model(jnp.asarray(ids))
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), _hf_logits(hf, ids), atol=0.1, rtol=0)


@pytest.mark.parametrize("mesh_shape", [dict(fsdp=2, tensor=4), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_load_gives_single_device_logits(qwen2_path, mesh_shape, tmp_path):
    assert jax.device_count() == 8
    mesh = shd.make_mesh(mesh_shape)
    model = load_hf(qwen2_path, mesh=mesh)
    single = load_hf(qwen2_path)
    q = model.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (
        q.shape[0] // 2, q.shape[1] // mesh_shape["tensor"])
    ids = jnp.asarray(_ids((4, 10), seed=6))
    mask = jnp.asarray(np.pad(np.ones((4, 8), np.int32), ((0, 0), (2, 0))))
    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh):
        ids_s = jax.device_put(ids, shd.logical_to_sharding(("batch", "length"), mesh))
        sharded = jax.jit(lambda st, x, m: nnx.merge(graphdef, st)(x, attention_mask=m))(
            state, ids_s, mask)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single(ids, attention_mask=mask)),
                               atol=1e-5, rtol=0)
    # saving gathers the shards back into the original tensors
    saved = load_file(os.path.join(save_hf(model, tmp_path / "out"), "model.safetensors"))
    original = load_file(os.path.join(qwen2_path, "model.safetensors"))
    assert saved.keys() == original.keys()
    for name in original:
        np.testing.assert_array_equal(saved[name].numpy(), original[name].numpy(), err_msg=name)


def test_sharded_forward_cached_matches_transformers(qwen2_path):
    """Prefill + one decode step with params and a KV cache sharded over 8 devices."""
    from scope_jax.models import CACHE_LOGICAL_AXES

    mesh = shd.make_mesh(dict(data=2, fsdp=2, tensor=2))
    model = load_hf(qwen2_path, mesh=mesh)
    hf = transformers.AutoModelForCausalLM.from_pretrained(qwen2_path, dtype=torch.float32).eval()
    ids = _ids((4, 6), seed=9)
    nxt = _ids((4, 1), seed=10)
    graphdef, state = nnx.split(model)
    cache = model.init_cache(4, 8)
    cache_sharding = shd.logical_to_sharding(CACHE_LOGICAL_AXES, mesh, shape=cache.k.shape)
    assert cache_sharding.spec[1] == ("data", "fsdp")
    cache = jax.device_put(cache, cache_sharding)
    kv_mask = np.zeros((4, 8), bool)
    kv_mask[:, :7] = True

    @jax.jit
    def run(state, cache):
        m = nnx.merge(graphdef, state)
        pos = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (4, 6))
        _, cache = m.forward_cached(jnp.asarray(ids), pos, cache, 0, jnp.asarray(kv_mask))
        return m.forward_cached(jnp.asarray(nxt), jnp.full((4, 1), 6, jnp.int32), cache, 6,
                                jnp.asarray(kv_mask))

    with jax.set_mesh(mesh):
        logits, cache = run(state, cache)
    assert cache.k.sharding.spec[1] == ("data", "fsdp")
    ref = _hf_logits(hf, np.concatenate([ids, nxt], axis=1))[:, -1]
    np.testing.assert_allclose(np.asarray(logits[:, 0]), ref, atol=ATOL, rtol=0)


def test_multi_file_checkpoint_with_index(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "multi", "qwen3", max_shard_size="30KB")
    assert os.path.exists(path / "model.safetensors.index.json")
    assert sum(f.endswith(".safetensors") for f in os.listdir(path)) > 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = _ids((1, 6), seed=7)
    np.testing.assert_allclose(np.asarray(load_hf(path)(jnp.asarray(ids))), _hf_logits(hf, ids),
                               atol=ATOL, rtol=0)


def test_old_style_top_level_rope_theta(tmp_path):
    """config.json with a top-level rope_theta and no rope_parameters (pre-5 checkpoints)."""
    path = make_tiny_checkpoint(tmp_path / "old", "llama", rope_theta=123.0)
    cfg = json.load(open(path / "config.json"))
    cfg.pop("rope_parameters")
    cfg["rope_theta"], cfg["rope_scaling"] = 123.0, None
    json.dump(cfg, open(path / "config.json", "w"))
    assert ModelConfig.from_pretrained(path).rope_theta == 123.0
    hf = make_tiny_model("llama", rope_theta=123.0)  # same seed -> same weights
    ids = _ids((1, 12), seed=8)
    np.testing.assert_allclose(np.asarray(load_hf(path)(jnp.asarray(ids))), _hf_logits(hf, ids),
                               atol=ATOL, rtol=0)


def _edit_tensors(path, fn):
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_checkpoint_errors_name_the_tensor(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "ck", "qwen2")
    name = "model.layers.1.self_attn.k_proj.bias"
    _edit_tensors(path, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.bias'"):
        load_hf(path)
    _edit_tensors(path, lambda t: t.update({name: torch.zeros(31)}))
    with pytest.raises(CheckpointError, match=r"k_proj\.bias'.*shape \(31,\), expected \(32,\)"):
        load_hf(path)
    _edit_tensors(path, lambda t: t.update({name: torch.zeros(32), "model.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.extra\.weight'"):
        load_hf(path)
    _edit_tensors(path, lambda t: t.pop("model.extra.weight"))
    load_hf(path)  # repaired


@pytest.mark.parametrize("edit, error, match", [
    (dict(model_type="mistral", architectures=["MistralForCausalLM"]), NotImplementedError,
     "MistralForCausalLM"),
    (dict(architectures=["Qwen2ForSequenceClassification"]), NotImplementedError,
     "Qwen2ForSequenceClassification"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                           "long_factor": [2.0] * 8}),
     NotImplementedError, "rope_type 'longrope'"),
    (dict(rope_parameters=None, rope_scaling={"type": "linear"}),
     ValueError, r"rope_scaling\['factor'\]"),
    (dict(hidden_act="gelu"), NotImplementedError, "gelu"),
    (dict(use_sliding_window=True, sliding_window=4, max_window_layers=1, layer_types=None),
     NotImplementedError, "sliding"),
    (dict(num_attention_heads=None), ValueError, "num_attention_heads"),
])
def test_config_errors(qwen2_path, edit, error, match):
    cfg = json.load(open(qwen2_path / "config.json"))
    cfg.update(edit)
    with pytest.raises(error, match=match):
        ModelConfig.from_hf(cfg)


def test_config_from_hf_fields(qwen2_path):
    cfg = ModelConfig.from_pretrained(qwen2_path)
    assert (cfg.model_type, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == ("qwen2", 4, 2, 16)
    assert cfg.qkv_bias and not cfg.o_bias and not cfg.qk_norm and cfg.rope_theta == 2e4
    multi_eos = ModelConfig.from_hf({**json.load(open(qwen2_path / "config.json")),
                                     "eos_token_id": [2, 7]})
    assert multi_eos.eos_token_id == (2, 7)
    hash(multi_eos)  # must stay hashable: it lives in the NNX graphdef


def test_check_checkpoint_tool_matches_transformers_greedy(qwen2_path, capsys):
    hf = transformers.AutoModelForCausalLM.from_pretrained(qwen2_path, dtype=torch.float32).eval()
    prompt = [1, 17, 42, 99]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert greedy_continue(load_hf(qwen2_path), prompt, 6) == ref
    assert check_main([str(qwen2_path), "--prompt-ids", "1,17,42,99", "--max-new-tokens", "3",
                       "--mesh", "fsdp=2,tensor=4"]) == 0
    out = capsys.readouterr().out
    assert "parameters: " in out and "P('fsdp', 'tensor')" in out and "greedy ids:" in out


def test_check_checkpoint_tool_with_text_prompt(tmp_path, capsys):
    import tokenizers

    path = make_tiny_checkpoint(tmp_path / "tok", "llama")
    words = ["two", "plus", "is", "four", "<unk>"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {w: i + 3 for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    assert check_main([str(path), "--prompt", "two plus two is", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "prompt ids: [3, 4, 3, 5]" in out and "greedy text:" in out
    with pytest.raises(SystemExit, match="outside the vocabulary"):
        check_main([str(path), "--prompt-ids", "1,999"])


def test_transformer_init_and_remat_grad():
    """A freshly initialised model runs; remat changes neither the loss nor its gradient."""
    cfg = ModelConfig(model_type="qwen3", vocab_size=32, hidden_size=16, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=24, qk_norm=True)
    ids = jnp.asarray(_ids((2, 5)) % 32)

    def loss_and_grad(remat):
        model = Transformer(cfg, rngs=nnx.Rngs(0), remat=remat)
        return nnx.jit(nnx.value_and_grad(lambda m: m(ids).mean()))(model)

    (l0, g0), (l1, g1) = loss_and_grad(False), loss_and_grad(True)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)


def test_model_shardings_follow_the_logical_axes_and_keep_logits():
    # model_shardings is what load_hf's mesh= placement and the dry run's abstract_model use.
    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48)
    model = Transformer(cfg, rngs=nnx.Rngs(1))
    ids = jnp.asarray(_ids((4, 6)) % 64)
    before = np.asarray(model(ids))
    mesh = shd.make_mesh(dict(fsdp=4, tensor=2))
    assert model.layers[0].mlp.down_proj.kernel.get_metadata()["logical_axes"] == ("mlp", "embed")
    shardings = shd.model_shardings(model, mesh)
    nnx.update(model, jax.device_put(nnx.state(model, nnx.Param), shardings))
    assert model.layers[0].mlp.down_proj.kernel[...].sharding.spec == jax.sharding.PartitionSpec(
        "tensor", "fsdp")
    np.testing.assert_allclose(np.asarray(model(ids)), before, atol=1e-5, rtol=0)


def test_logical_rules_and_mesh():
    mesh = shd.make_mesh({"fsdp": 2, "tensor": -1})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 4}
    P = jax.sharding.PartitionSpec
    assert shd.logical_to_spec(("embed", "heads"), shape=(64, 64), mesh=mesh) == P("fsdp", "tensor")
    # 2 kv heads * 1 dim can't split 4 ways -> replicated; the size-1 'data' axis is dropped
    assert shd.logical_to_spec(("batch", "kv_heads"), shape=(4, 2), mesh=mesh) == P("fsdp", None)
    with pytest.raises(KeyError, match="'nonsense'"):
        shd.logical_to_spec(("nonsense",))
    with pytest.raises(ValueError, match="needs 6 devices"):
        shd.make_mesh({"fsdp": 2, "tensor": 3})
    with pytest.raises(ValueError, match="unknown axes"):
        shd.make_mesh({"model": 8})


def test_initialize_distributed_is_a_noop_for_one_process(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
                "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert shd.initialize_distributed() is False
