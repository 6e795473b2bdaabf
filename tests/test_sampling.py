"""Tests of scope_jax.sampling.

Two kinds of models drive `generate`:
  * ToyModel, defined here, implements the model contract (init_cache / forward_cached) with
    logits whose next-token distribution is known in closed form, so EOS / length handling,
    positions, the KV mask, sampling frequencies and log-probs are checked against numpy
    re-derivations;
  * tiny random transformers checkpoints (tests/tiny_hf.py) loaded with scope_jax.models, whose
    greedy tokens are checked against transformers' generate and whose log-probs are checked
    against a teacher-forced forward pass.
"""
from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

from scope_jax import sampling
from scope_jax.sampling import FINISH_EOS, FINISH_LENGTH, generate


# ----------------------------------------------------------------------------- toy model


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    vocab_size: int


@flax.struct.dataclass
class ToyCache:
    k: jax.Array  # [1, B, S, 1, 1]: the token id written at each slot


class ToyModel(nnx.Module):
    """logits(next | context) = table[current token] + sum_scale * one_hot(target), where
    target = (sum of the ids in the attended cache slots + current position) % V.

    The sum only sees slots the contract says a query may attend (slot <= cache_index + t and
    kv_mask), so wrong positions, cache indices or masks change the greedy tokens.
    """

    def __init__(self, table, sum_scale=0.0):
        table = np.asarray(table, np.float32)
        self.config = ToyConfig(vocab_size=table.shape[0])
        self.table = nnx.Param(jnp.asarray(table))
        self.sum_scale = sum_scale

    def init_cache(self, batch_size, max_len, dtype=None):
        return ToyCache(k=jnp.zeros((1, batch_size, max_len, 1, 1), jnp.float32))

    def forward_cached(self, input_ids, positions, cache, cache_index, kv_mask):
        v = self.config.vocab_size
        t = input_ids.shape[1]
        k = jax.lax.dynamic_update_slice(
            cache.k, input_ids.astype(jnp.float32)[None, :, :, None, None],
            (0, 0, cache_index, 0, 0))
        slots = jnp.arange(k.shape[2])
        q_slots = cache_index + jnp.arange(t)
        allowed = (slots[None, None, :] <= q_slots[None, :, None]) & kv_mask[:, None, :]
        total = jnp.sum(jnp.where(allowed, k[0, :, None, :, 0, 0], 0.0), axis=-1)
        target = (total.astype(jnp.int32) + positions) % v
        logits = self.table[...][input_ids] + self.sum_scale * jax.nn.one_hot(target, v)
        return logits, ToyCache(k=k)


def sum_model(vocab=11):
    return ToyModel(np.zeros((vocab, vocab)), sum_scale=10.0)


def sum_model_reference(prompt, max_new, eos_ids, vocab=11):
    """numpy re-derivation of ToyModel(sum_scale>0, table=0) greedy decoding."""
    seq = list(prompt)
    out = []
    for _ in range(max_new):
        tok = (sum(seq) + len(seq) - 1) % vocab
        out.append(tok)
        seq.append(tok)
        if tok in eos_ids:
            return out, FINISH_EOS
    return out, FINISH_LENGTH


def reference_dist(logits, temperature, top_k=None, top_p=None):
    """numpy re-derivation of the truncated sampling distribution, following transformers'
    TopKLogitsWarper / TopPLogitsWarper (ascending sort, drop cumulative mass <= 1 - top_p)."""
    x = np.asarray(logits, np.float64) / temperature
    if top_k is not None and top_k < x.size:
        kth = np.sort(x)[::-1][top_k - 1]
        x = np.where(x < kth, -np.inf, x)
    if top_p is not None and top_p < 1:
        order = np.argsort(x, kind="stable")
        p = np.exp(x[order] - np.max(x))
        p /= p.sum()
        drop = np.cumsum(p) <= 1 - top_p
        drop[-1] = False
        x = x.copy()
        x[order[drop]] = -np.inf
    p = np.exp(x - np.max(x))
    return p / p.sum()


# ----------------------------------------------------------------------------- no model


def test_prompt_bucket_and_left_pad():
    assert [sampling.prompt_bucket(n) for n in (1, 16, 17, 32, 33, 100)] == [16, 16, 32, 32, 64,
                                                                            128]
    assert sampling.prompt_bucket(3, min_bucket=2) == 4
    ids, lengths = sampling.left_pad([[5, 6, 7], [9]], 4, pad_id=1)
    np.testing.assert_array_equal(ids, [[1, 5, 6, 7], [1, 1, 1, 9]])
    np.testing.assert_array_equal(lengths, [3, 1])
    with pytest.raises(ValueError, match="prompt 0 has 5 tokens"):
        sampling.left_pad([[1] * 5], 4, pad_id=0)


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, None, None), (0.6, None, None), (0.6, 20, None), (1.3, None, 0.9), (0.6, 20, 0.95),
    (1.0, 1, None), (0.8, None, 0.01), (1.0, 500, 0.5)])
def test_sampling_logprobs_match_numpy(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(6, 300)).astype(np.float32) * 3
    got = np.asarray(sampling.sampling_logprobs(jnp.asarray(logits), temperature=temperature,
                                                top_k=top_k, top_p=top_p))
    for row, got_row in zip(logits, got):
        want = reference_dist(row, temperature, top_k, top_p)
        np.testing.assert_array_equal(np.isfinite(got_row), want > 0)
        np.testing.assert_allclose(np.exp(got_row), want, atol=1e-6)


def test_top_p_on_flat_rows_takes_the_exact_fallback():
    # Flat rows need far more than the 64 candidates sampling_logprobs looks at first, so they
    # go through the bisection fallback; the peaked row in the same batch does not.
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 300)).astype(np.float32) * np.array([[0.1], [0.5], [4.0]],
                                                                      np.float32)
    for top_p in (0.9, 0.5):
        got = np.asarray(sampling.sampling_logprobs(jnp.asarray(logits), temperature=1.0,
                                                    top_p=top_p))
        for row, got_row in zip(logits, got):
            want = reference_dist(row, 1.0, None, top_p)
            np.testing.assert_array_equal(np.isfinite(got_row), want > 0)
            np.testing.assert_allclose(np.exp(got_row), want, atol=1e-6)
    assert np.isfinite(got[0]).sum() > 64  # the fallback was needed


def test_sampling_logprobs_rejects_zero_temperature():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sampling.sampling_logprobs(jnp.zeros((1, 4)), temperature=0.0)


def test_sample_categorical_inverts_the_cdf():
    rng = np.random.default_rng(5)
    v = 1000  # blocks of 32, the last one partial
    p = rng.random(v) ** 4
    p[rng.random(v) < 0.3] = 0.0  # excluded tokens (as after top-k / top-p)
    p[:40] = 0.0  # a whole zero block, and a zero first token
    p[-3:] = 0.0
    p /= p.sum()
    lp = jnp.log(jnp.asarray(p, jnp.float32))
    n = 200_000
    u = rng.random((n, 2)).astype(np.float32)
    draws = np.asarray(sampling.sample_categorical(jnp.broadcast_to(lp, (n, v)), jnp.asarray(u)))
    counts = np.bincount(draws, minlength=v)
    assert counts[p == 0].sum() == 0
    support = p > 0
    expected = p[support] * n
    chi2 = np.sum((counts[support] - expected) ** 2 / expected)
    assert chi2 < scipy.stats.chi2.ppf(1 - 1e-4, df=support.sum() - 1)
    # the extremes of u land on the first and the last token of the support
    edges = np.asarray(sampling.sample_categorical(
        jnp.broadcast_to(lp, (2, v)), jnp.asarray([[0.0, 0.0], [0.9999999, 0.9999999]])))
    np.testing.assert_array_equal(edges, [np.flatnonzero(p)[0], np.flatnonzero(p)[-1]])


def bigram_model(probs_by_prev):
    """A ToyModel whose next token depends only on the current one: p(next | prev) given."""
    return ToyModel(np.log(np.asarray(probs_by_prev)))


def test_sampled_frequencies_follow_known_distribution():
    # p(next) is the same after every token, so all 4 * 4000 draws share one distribution.
    p = np.array([0.35, 0.25, 0.2, 0.1, 0.06, 0.04])
    model = bigram_model(np.tile(p, (6, 1)))
    temperature, top_k = 0.7, 5
    out = generate(model, [[0]], num_samples=4000, max_new_tokens=4, temperature=temperature,
                   top_k=top_k, key=jax.random.key(1))
    counts = np.bincount(np.asarray(out.tokens).ravel(), minlength=6)
    want = reference_dist(np.log(p), temperature, top_k)
    assert counts[5] == 0  # excluded by top-k
    expected = want[:5] * counts.sum()
    chi2 = np.sum((counts[:5] - expected) ** 2 / expected)
    # Fixed key, so the outcome is deterministic; the bound is the 1e-4 upper tail of chi2(4),
    # a level a correct sampler passes with near certainty.
    assert chi2 < scipy.stats.chi2.ppf(1 - 1e-4, df=4), (counts, expected)
    # Power: the same counts are far from the distribution a sampler ignoring the temperature
    # (or ignoring top-k) would produce.
    for wrong in (reference_dist(np.log(p), 1.0, top_k), reference_dist(np.log(p), temperature)):
        support = wrong > 0
        exp_wrong = wrong[support] * counts.sum()
        chi2_wrong = np.sum((counts[support] - exp_wrong) ** 2 / exp_wrong)
        assert chi2_wrong > 10 * scipy.stats.chi2.ppf(1 - 1e-4, df=5)


@pytest.mark.parametrize("top_k,top_p,allowed", [
    # p ** (1 / 1.5) renormalised: 0.406, 0.289, 0.182, 0.062, 0.030, 0.030
    (3, None, {0, 1, 2}),
    (None, 0.75, {0, 1, 2}),   # 0.406 + 0.289 = 0.695 < 0.75, so token 2 is still needed
    (None, 0.5, {0, 1}),
    (None, 0.3, {0}),
    (3, 0.6, {0, 1}),          # renormalised after top-k: 0.463, 0.330, 0.207
])
def test_top_k_top_p_stay_in_allowed_set(top_k, top_p, allowed):
    p = np.array([0.5, 0.3, 0.15, 0.03, 0.01, 0.01])
    assert set(np.flatnonzero(reference_dist(np.log(p), 1.5, top_k, top_p))) == allowed
    model = bigram_model(np.tile(p, (6, 1)))
    out = generate(model, [[1], [2, 3]], num_samples=300, max_new_tokens=6, temperature=1.5,
                   top_k=top_k, top_p=top_p, key=jax.random.key(2))
    seen = set(np.unique(np.asarray(out.tokens)).tolist())
    assert seen == allowed  # never outside, and every allowed token does occur


def test_logprobs_are_the_sampled_and_the_policy_distribution():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(7, 7)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    model = bigram_model(probs)
    temperature, top_k, top_p = 0.8, 4, 0.9
    prompts = [[0, 3], [5], [6, 6, 1]]
    out = generate(model, prompts, num_samples=3, max_new_tokens=9, temperature=temperature,
                   top_k=top_k, top_p=top_p, key=jax.random.key(4))
    tokens = np.asarray(out.tokens)
    for row in range(tokens.shape[0]):
        prev = prompts[row // 3][-1]
        for t in range(9):
            tok = tokens[row, t]
            want = reference_dist(np.log(probs[prev]), temperature, top_k, top_p)
            np.testing.assert_allclose(out.logprobs[row, t], np.log(want[tok]), atol=1e-5)
            np.testing.assert_allclose(out.policy_logprobs[row, t], np.log(probs[prev, tok]),
                                       atol=1e-5)
            prev = tok


def test_greedy_sum_model_positions_mask_and_eos():
    vocab, pad_id = 11, 3  # a non-zero pad id: attending padding would change the sums
    model = sum_model(vocab)
    prompts = [[1], [4, 2, 7], [10] * 17, [5, 5, 5, 5, 5], [2, 9]]
    eos_ids = [0, 7]
    out = generate(model, prompts, max_new_tokens=12, eos_ids=eos_ids, pad_id=pad_id)
    assert out.tokens.shape == (5, 12) and out.prompt_ids.shape == (5, 32)
    reasons = set()
    for row, prompt in enumerate(prompts):
        want, reason = sum_model_reference(prompt, 12, eos_ids, vocab)
        n = len(want)
        reasons.add(reason)
        np.testing.assert_array_equal(out.tokens[row, :n], want)
        np.testing.assert_array_equal(out.tokens[row, n:], pad_id)
        assert int(out.lengths[row]) == n
        assert int(out.finish_reason[row]) == reason
        np.testing.assert_array_equal(out.response_mask[row], np.arange(12) < n)
        np.testing.assert_array_equal(out.policy_logprobs[row, n:], 0.0)
        np.testing.assert_array_equal(out.logprobs[row], out.policy_logprobs[row])
        assert np.all(np.asarray(out.policy_logprobs[row, :n]) < 0)
    assert reasons == {FINISH_EOS, FINISH_LENGTH}  # the prompts exercise both
    assert sampling.finish_reason_names(out) == [
        "eos" if sum_model_reference(p, 12, eos_ids, vocab)[1] == FINISH_EOS else "length" for p in prompts]
    assert sampling.response_lists(out)[1] == sum_model_reference(prompts[1], 12, eos_ids)[0]
    np.testing.assert_array_equal(out.prompt_lengths, [len(p) for p in prompts])


def test_every_row_eos_stops_early_and_max_length():
    model = sum_model()
    prompts = [[1], [4, 2, 7]]
    first = [sum_model_reference(p, 1, [])[0][0] for p in prompts]
    out = generate(model, prompts, max_new_tokens=5, eos_ids=first)
    np.testing.assert_array_equal(out.lengths, [1, 1])
    np.testing.assert_array_equal(out.finish_reason, [FINISH_EOS] * 2)
    np.testing.assert_array_equal(out.tokens[:, 1:], 0)
    out = generate(model, prompts, max_new_tokens=1)
    np.testing.assert_array_equal(out.lengths, [1, 1])
    np.testing.assert_array_equal(out.finish_reason, [FINISH_LENGTH] * 2)
    np.testing.assert_array_equal(out.tokens[:, 0], first)


def test_full_sequences_rebuilds_prompt_plus_response():
    model = sum_model()
    prompts = [[1, 2], [4, 2, 7, 7, 1]]
    out = generate(model, prompts, max_new_tokens=6, eos_ids=[0])
    ids, mask = sampling.full_sequences(out)
    ids, mask = np.asarray(ids), np.asarray(mask)
    for row, prompt in enumerate(prompts):
        real = ids[row][mask[row]].tolist()
        assert real == prompt + sampling.response_lists(out)[row]
        # real tokens are contiguous
        idx = np.flatnonzero(mask[row])
        assert np.all(np.diff(idx) == 1)


def test_num_samples_adjacent_and_key_determinism():
    # Token t is only ever followed by tokens of its own residue class mod 3, so each row's
    # tokens identify its prompt.
    vocab = 9
    probs = np.array([[1.0 if (j - i) % 3 == 0 else 1e-9 for j in range(vocab)]
                      for i in range(vocab)])
    model = bigram_model(probs / probs.sum(-1, keepdims=True))
    prompts = [[0], [4], [2]]
    kw = dict(num_samples=4, max_new_tokens=8, temperature=1.0, top_k=3)
    out = generate(model, prompts, key=jax.random.key(5), **kw)
    tokens = np.asarray(out.tokens)
    np.testing.assert_array_equal(out.group_ids, np.repeat([0, 1, 2], 4))
    for row in range(12):
        assert set((tokens[row] % 3).tolist()) == {prompts[row // 4][0] % 3}
    assert len({tuple(r) for r in tokens[:4]}) > 1  # samples of one prompt differ
    again = generate(model, prompts, key=jax.random.key(5), **kw)
    np.testing.assert_array_equal(again.tokens, tokens)
    np.testing.assert_array_equal(again.logprobs, out.logprobs)
    other = generate(model, prompts, key=jax.random.key(6), **kw)
    assert not np.array_equal(np.asarray(other.tokens), tokens)


def test_mesh_sharded_rows_give_the_same_tokens(monkeypatch):
    assert len(jax.devices()) == 8, "tests/conftest.py should give 8 CPU devices"
    monkeypatch.setattr(sampling, "FIRST_PHASE", 2)  # decode phases 2, 4, 8, 10 on the mesh
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    model = sum_model()
    prompts = [[1], [4, 2, 7], [10] * 17, [5, 5], [2, 9]]  # 5 rows -> padded to 8
    ref = generate(model, prompts, max_new_tokens=10, eos_ids=[0])
    got = generate(model, prompts, max_new_tokens=10, eos_ids=[0], mesh=mesh)
    for field in ("tokens", "lengths", "finish_reason", "policy_logprobs", "response_mask"):
        np.testing.assert_array_equal(getattr(got, field), getattr(ref, field), err_msg=field)
    p = np.array([0.4, 0.3, 0.2, 0.1])
    model = bigram_model(np.tile(p, (4, 1)))
    kw = dict(num_samples=3, max_new_tokens=6, temperature=0.9, key=jax.random.key(7))
    ref = generate(model, [[0], [1], [2]], **kw)
    got = generate(model, [[0], [1], [2]], mesh=mesh, **kw)
    np.testing.assert_array_equal(got.tokens, ref.tokens)


def test_prefill_never_builds_all_prompt_logits():
    # [B, P, V] prompt logits would be 8 * 512 * 4096 * 4 B = 64 MiB here (and terabytes at
    # real scale); only the last position's [B, V] is needed.
    model = ToyModel(np.zeros((4096, 4096)))
    graphdef, state = nnx.split(model)
    settings = sampling._Settings(max_new_tokens=4, temperature=0.0, top_k=None, top_p=None,
                                  pad_id=0)
    compiled = sampling._prefill_program.lower(
        graphdef, state, np.ones((8, 512), np.int32), np.full((8,), 512, np.int32),
        jax.random.split(jax.random.key(0), 8), np.zeros((8,), bool), jnp.zeros((0,), jnp.int32),
        settings=settings, mesh=None, stop=4).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 8 * 2**20


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompts=[]), "non-empty list"),
    (dict(prompts=[[1], []]), r"prompts\[1\]"),
    (dict(prompts=[[1, 99]]), r"prompts\[0\] has token ids outside"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(num_samples=0), "num_samples"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=1.0), "needs a PRNG key"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=1.5), "top_p"),
    (dict(eos_ids=[11]), "eos_ids"),
    (dict(pad_id=-1), "pad_id"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
])
def test_bad_arguments_raise(kwargs, match):
    args = dict(prompts=[[1, 2]], max_new_tokens=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(sum_model(), args.pop("prompts"), **args)


def test_mesh_without_batch_axis_raises():
    mesh = jax.make_mesh((8,), ("tensor",), axis_types=(jax.sharding.AxisType.Auto,))
    with pytest.raises(ValueError, match="include none of"):
        generate(sum_model(), [[1]], max_new_tokens=2, mesh=mesh)


# ----------------------------------------------------------------------------- real checkpoints


_CHECKPOINTS = {}


def load_checkpoint(family, tmp_path_factory):
    """(family, scope_jax model, transformers model) of a tiny random checkpoint, built once."""
    import transformers

    from scope_jax.models import load_hf
    from tests.tiny_hf import make_tiny_checkpoint

    if family not in _CHECKPOINTS:
        # Weights no other test uses: a seed of our own; tied embeddings only for Qwen3.
        path = make_tiny_checkpoint(tmp_path_factory.mktemp(family), family, seed=11,
                                    tie_word_embeddings=family == "qwen3")
        hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        _CHECKPOINTS[family] = (family, load_hf(path), hf, path)
    return _CHECKPOINTS[family][:3]


@pytest.fixture(scope="module", params=["qwen2", "qwen3", "llama"])
def checkpoint(request, tmp_path_factory):
    return load_checkpoint(request.param, tmp_path_factory)


def hf_greedy(hf, prompt, max_new_tokens, eos_id):
    """transformers' greedy generate on one unpadded prompt; returns the new ids."""
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def hf_token_logprobs(hf, prompt, response):
    """log-softmax of transformers' teacher-forced logits at each response token (float64)."""
    import torch

    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = hf(ids).logits[0].double()
    lp = torch.log_softmax(logits, -1)[len(prompt) - 1:-1]
    return lp, lp[torch.arange(len(response)), torch.tensor(response)].numpy()


PROMPT_LENGTHS = (1, 4, 9, 17, 30)


def random_prompts(seed, vocab=160):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in PROMPT_LENGTHS]


def test_greedy_matches_transformers_generate(checkpoint):
    family, model, hf = checkpoint
    prompts = random_prompts(0)
    # EOS id chosen as a token the model does emit for one prompt, so both stop paths happen.
    probe = hf_greedy(hf, prompts[2], 20, eos_id=None)
    eos_id = probe[5]
    out = generate(model, prompts, max_new_tokens=20, eos_ids=[eos_id], pad_id=0)
    got = sampling.response_lists(out)
    reasons = sampling.finish_reason_names(out)
    for i, prompt in enumerate(prompts):
        want = hf_greedy(hf, prompt, 20, eos_id=eos_id)
        assert got[i] == want, (family, i)
        assert reasons[i] == ("eos" if want[-1] == eos_id else "length")
    assert "eos" in reasons
    # policy log-probs of the greedy tokens equal transformers' teacher-forced forward pass
    for i, prompt in enumerate(prompts):
        n = len(got[i])
        _, want = hf_token_logprobs(hf, prompt, got[i])
        np.testing.assert_allclose(out.policy_logprobs[i, :n], want, atol=1e-4)


def test_sampled_logprobs_match_teacher_forcing(checkpoint):
    family, model, hf = checkpoint
    prompts = random_prompts(1)[:3]
    temperature, top_k, top_p = 0.7, 20, 0.9
    out = generate(model, prompts, num_samples=2, max_new_tokens=16, temperature=temperature,
                   top_k=top_k, top_p=top_p, eos_ids=[2], key=jax.random.key(8))
    responses = sampling.response_lists(out)
    for row, response in enumerate(responses):
        prompt = prompts[row // 2]
        lp_all, want_policy = hf_token_logprobs(hf, prompt, response)
        n = len(response)
        np.testing.assert_allclose(out.policy_logprobs[row, :n], want_policy, atol=1e-4)
        for t, tok in enumerate(response):
            dist = reference_dist(lp_all[t].numpy(), temperature, top_k, top_p)
            assert dist[tok] > 0, (family, row, t)  # inside the top-k / top-p set
            np.testing.assert_allclose(out.logprobs[row, t], np.log(dist[tok]), atol=1e-4)
    # and our own model's teacher-forced pass over the rebuilt sequences agrees too
    ids, mask = sampling.full_sequences(out)
    logits = model(ids, attention_mask=mask)
    lp = jax.nn.log_softmax(logits, -1)
    p = out.prompt_ids.shape[1]
    pred = jnp.take_along_axis(lp[:, p - 1:-1], out.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.where(out.response_mask, pred, 0.0), out.policy_logprobs,
                               atol=1e-4)


def test_real_model_mesh_matches_single_device(tmp_path_factory, monkeypatch):
    from scope_jax.models import load_hf
    from scope_jax.sharding import make_mesh

    _, model, _ = load_checkpoint("qwen3", tmp_path_factory)
    monkeypatch.setattr(sampling, "FIRST_PHASE", 4)  # phases 4, 8: the cache grows on the mesh
    prompts = random_prompts(2)  # 5 rows
    ref = generate(model, prompts, max_new_tokens=8)
    # rows over data x fsdp = 4 (padded to 8), the tensor axis left to the model's constraints
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = load_hf(_CHECKPOINTS["qwen3"][3], mesh=mesh)  # params split over fsdp / tensor
    for m in (model, sharded):
        got = generate(m, prompts, max_new_tokens=8, mesh=mesh)
        assert got.tokens.sharding.num_devices == 8
        np.testing.assert_array_equal(got.tokens, ref.tokens)
        np.testing.assert_allclose(got.policy_logprobs, ref.policy_logprobs, atol=1e-5)


def test_remat_model_generates_the_same_tokens(tmp_path_factory):
    # remat only matters for a backward pass; the sampler's cached forward must neither apply
    # it nor trip over it (nnx.remat inside the decode while_loop raised TraceContextError).
    from scope_jax.models import load_hf

    _, model, _ = load_checkpoint("qwen3", tmp_path_factory)
    remat = load_hf(_CHECKPOINTS["qwen3"][3], remat=True)
    assert remat.remat == "full" and model.remat == "none"
    prompts = random_prompts(3)
    for kw in (dict(), dict(temperature=0.8, top_k=20, key=jax.random.key(9))):
        want = generate(model, prompts, max_new_tokens=12, **kw)
        got = generate(remat, prompts, max_new_tokens=12, **kw)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_array_equal(got.policy_logprobs, want.policy_logprobs)


def test_decode_phases_give_the_single_phase_output(tmp_path_factory, monkeypatch):
    # Phases end at 4, 8, 16, 32 and 40 tokens; the single-phase run attends over the whole
    # 40-token cache at every step, as the sampler did before phases.
    _, model, _ = load_checkpoint("qwen3", tmp_path_factory)
    prompts = random_prompts(4) + random_prompts(5)  # 10 rows
    kw = dict(num_samples=2, max_new_tokens=40, temperature=1.0, key=jax.random.key(10))
    monkeypatch.setattr(sampling, "FIRST_PHASE", 10**6)
    free = np.asarray(generate(model, prompts, **kw).tokens)  # no EOS: every row runs 40
    # EOS ids: tokens some row produces at steps 2, 6, 12, 25 and 35 (one per phase).
    eos = sorted({int(free[r, t]) for r, t in ((0, 2), (3, 6), (7, 12), (11, 25), (15, 35))})
    hits = np.isin(free, eos)
    ends = np.where(hits.any(1), hits.argmax(1) + 1, 40)  # response lengths that must result
    phase = np.searchsorted([4, 8, 16, 32, 40], ends)  # the phase each row ends in
    assert len(set(phase[ends < 40])) >= 3 and np.any(ends == 40) and np.any(phase == 4)

    single = generate(model, prompts, eos_ids=eos, **kw)
    monkeypatch.setattr(sampling, "FIRST_PHASE", 4)
    phased = generate(model, prompts, eos_ids=eos, **kw)
    for out in (single, phased):
        np.testing.assert_array_equal(out.lengths, ends)
        np.testing.assert_array_equal(out.finish_reason, np.where(ends < 40, FINISH_EOS,
                                                                  FINISH_LENGTH))
        np.testing.assert_array_equal(np.where(out.response_mask, out.tokens, -1),
                                      np.where(np.arange(40) < ends[:, None], free, -1))
    np.testing.assert_array_equal(phased.tokens, single.tokens)
    np.testing.assert_array_equal(phased.response_mask, single.response_mask)
    # Log-probs agree to float32 rounding: attention reduces over cache lengths that differ
    # between the runs (as they already did between two max_new_tokens before phases).
    for field in ("logprobs", "policy_logprobs"):
        np.testing.assert_allclose(getattr(phased, field), getattr(single, field), atol=1e-5,
                                   rtol=0, err_msg=field)


def test_phases_are_exact_on_the_sum_model_and_stop_when_rows_end(monkeypatch):
    # The toy model's logits are exact integers, so here phases must not change a single bit,
    # and rows ending early must not run (or compile) later phases.
    model = sum_model()
    prompts = [[1], [4, 2, 7], [10] * 17, [5, 5, 5, 5, 5], [2, 9], [3, 3]]
    calls = []
    phase_program = sampling._phase_program

    def spy(*args, **kw):
        calls.append((kw["start"], kw["stop"]))
        return phase_program(*args, **kw)

    monkeypatch.setattr(sampling, "_phase_program", spy)
    monkeypatch.setattr(sampling, "FIRST_PHASE", 2)
    for eos_ids in ([0, 7], [0], []):
        want = [sum_model_reference(p, 30, eos_ids) for p in prompts]
        out = generate(model, prompts, max_new_tokens=30, eos_ids=eos_ids)
        assert sampling.response_lists(out) == [w[0] for w in want]
        np.testing.assert_array_equal(out.finish_reason, [w[1] for w in want])
        longest = max(len(w[0]) for w in want)
        # phases after the first run while a row is live: up to the phase holding `longest`
        assert calls == [(s, e) for s, e in [(2, 4), (4, 8), (8, 16), (16, 30)] if s < longest]
        calls.clear()
    first = [sum_model_reference(p, 1, [])[0][0] for p in prompts]
    out = generate(model, prompts, max_new_tokens=4096, eos_ids=first)
    np.testing.assert_array_equal(out.lengths, 1)
    assert calls == []  # every row ended in the first phase: no later phase ran


def hf_generate(hf, prompt, max_new_tokens, **kw):
    """transformers' generate on one unpadded prompt without EOS; returns the new ids."""
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                          min_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


def test_repetition_penalty_greedy_matches_transformers(checkpoint, monkeypatch):
    family, model, hf = checkpoint
    monkeypatch.setattr(sampling, "FIRST_PHASE", 8)  # the penalised tokens cross 3 phases
    prompts = random_prompts(6)
    penalty = 1.5  # strong enough to change the tiny models' greedy continuations
    out = generate(model, prompts, max_new_tokens=24, repetition_penalty=penalty)
    plain = generate(model, prompts, max_new_tokens=24)
    got, unpenalised = sampling.response_lists(out), sampling.response_lists(plain)
    changed = 0
    for i, prompt in enumerate(prompts):
        assert got[i] == hf_generate(hf, prompt, 24, do_sample=False,
                                     repetition_penalty=penalty), (family, i)
        assert unpenalised[i] == hf_generate(hf, prompt, 24, do_sample=False), (family, i)
        changed += got[i] != unpenalised[i]
    assert changed >= 2, (family, changed)  # the penalty is exercised, not a no-op
    # The same penalty from a batch with left padding: padding tokens (pad_id 5 here, a token
    # the prompts may hold) are not penalised, only the real prompt tokens.
    padded = generate(model, prompts, max_new_tokens=24, repetition_penalty=penalty, pad_id=5)
    assert sampling.response_lists(padded) == got


def test_repetition_penalty_logprobs(checkpoint):
    # logprobs: the distribution sampled from, penalty included (transformers' own processor
    # applied to a teacher-forced forward pass is the reference); policy_logprobs: raw policy.
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    family, model, hf = checkpoint
    prompts = random_prompts(7)[:3]
    penalty, temperature, top_k, top_p = 1.3, 0.8, 20, 0.9
    processor = RepetitionPenaltyLogitsProcessor(penalty)
    for kw in (dict(), dict(temperature=temperature, top_k=top_k, top_p=top_p,
                            key=jax.random.key(12))):
        out = generate(model, prompts, max_new_tokens=12, repetition_penalty=penalty, **kw)
        for row, response in enumerate(sampling.response_lists(out)):
            prompt = prompts[row]
            _, want_policy = hf_token_logprobs(hf, prompt, response)
            np.testing.assert_allclose(out.policy_logprobs[row, :12], want_policy, atol=1e-4)
            with torch.no_grad():
                logits = hf(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:]
            for t, tok in enumerate(response):
                scores = processor(torch.tensor([prompt + response[:t]]), logits[t][None])
                if kw:
                    dist = reference_dist(scores[0].double().numpy(), temperature, top_k, top_p)
                else:
                    dist = torch.softmax(scores[0].double(), -1).numpy()
                    assert tok == int(np.argmax(dist)), (family, row, t)
                np.testing.assert_allclose(out.logprobs[row, t], np.log(dist[tok]), atol=1e-4,
                                           err_msg=f"{family} row {row} step {t}")


def test_stop_ids_one_rule_for_training_evaluation_and_tools(tmp_path):
    # Qwen-style: the tokenizer stops on <|im_end|> (7), the model config on <|endoftext|> (5)
    # and generation_config.json names both plus 9; training, evaluation and the tools all stop
    # on the union (they used to pick different subsets).
    import json
    import types

    tok = types.SimpleNamespace(eos_token_id=7)
    config = types.SimpleNamespace(eos_token_id=(5,))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9, 5]}))
    assert sampling.stop_ids(config, tok, [11], checkpoint=str(tmp_path)) == [5, 7, 9, 11]
    assert sampling.stop_ids(config, tok) == [5, 7]
    assert sampling.stop_ids(checkpoint=str(tmp_path / "absent")) == []
    (tmp_path / "generation_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="generation_config.json: invalid JSON at line 1"):
        sampling.stop_ids(checkpoint=str(tmp_path))
