"""Tests of scope_jax.evaluation and tools/eval.py.

Metrics are checked against independent references: Pass@k against brute-force enumeration of
every k-subset of the samples and against exact rational binomials (fractions + math.comb);
bootstrap intervals against scipy.stats.bootstrap and the normal approximation. The loop runs
the real sampler on a tiny random Hugging Face checkpoint with a tokenizer trained here, and
the real verifier pool; its rewards are re-derived by calling the verifier in-process on the
stored responses.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from fractions import Fraction

import numpy as np
import pytest
import scipy.stats

from scope_jax import evaluation as ev
from scope_jax.data import PAPER_INSTRUCTION

# ----------------------------------------------------------------------------- Pass@k / Avg@k


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (c of them correct) that hold a correct one."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_matches_subset_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                got = float(ev.pass_at_k(n, c, k))
                assert got == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_vectorised_and_large_n_against_exact_fractions():
    # Binomials such as C(2000, 1000) overflow float64; the product form must not.
    rng = np.random.default_rng(0)
    n = np.array([2000, 2000, 1500, 64, 64, 32, 32])
    c = np.array([1, 1000, 7, 0, 63, 5, 32])
    for k in (1, 2, 16, 32):
        got = ev.pass_at_k(n, c, k)
        want = [float(exact_pass_at_k(int(a), int(b), k)) for a, b in zip(n, c)]
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    n = rng.integers(32, 100, size=50)
    c = rng.integers(0, 32, size=50)
    got = ev.pass_at_k(n, c, 32)
    want = [float(exact_pass_at_k(int(a), int(b), 32)) for a, b in zip(n, c)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_pass_at_k_edge_cases():
    assert ev.pass_at_k(10, 0, 5) == 0.0  # no correct sample
    assert ev.pass_at_k(10, 10, 5) == 1.0  # all correct
    assert ev.pass_at_k(8, 0, 8) == 0.0 and ev.pass_at_k(8, 1, 8) == 1.0  # k = n
    assert ev.pass_at_k(10, 6, 5) == 1.0  # k > n - c: every subset holds a correct one
    assert ev.pass_at_k(10, 5, 5) < 1.0  # k = n - c: one subset of C(10, 5) misses
    assert float(ev.pass_at_k(10, 5, 5)) == pytest.approx(1 - 1 / 252)
    for n, c in [(7, 0), (7, 3), (7, 7)]:
        assert float(ev.pass_at_k(n, c, 1)) == pytest.approx(c / n)  # pass@1 = accuracy
    with pytest.raises(ValueError, match="at least k"):
        ev.pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="k must be"):
        ev.pass_at_k(4, 1, 0)
    with pytest.raises(ValueError, match=r"problem 1 has c=5, n=4"):
        ev.pass_at_k([4, 4], [1, 5], 2)
    with pytest.raises(ValueError, match="c"):
        ev.pass_at_k(4, -1, 2)
    with pytest.raises(ValueError, match="integers"):
        ev.pass_at_k(4, 1.5, 2)


def test_paper_pass_at_k_hand_computed():
    # The cases: n = k = 32; the unbiased estimator gives 1 for any c >= 1.
    assert float(ev.pass_at_k(32, 1, 32, estimator="paper")) == pytest.approx(1 - (31 / 32) ** 32)
    assert float(ev.pass_at_k(32, 1, 32, estimator="paper")) == pytest.approx(0.638, abs=5e-4)
    assert float(ev.pass_at_k(32, 2, 32, estimator="paper")) == pytest.approx(0.873, abs=5e-4)
    assert float(ev.pass_at_k(32, 2, 32)) == 1.0
    assert float(ev.pass_at_k(4, 0, 4, estimator="paper")) == 0.0
    with pytest.raises(ValueError, match="at least k samples"):  # k > n: refused (issue 22)
        ev.pass_at_k(4, 4, 8, estimator="paper")
    assert float(ev.pass_at_k(4, 1, 2, estimator="paper")) == pytest.approx(1 - 0.75 ** 2)
    with pytest.raises(ValueError, match="estimator"):
        ev.pass_at_k(4, 1, 2, estimator="biased")


def test_paper_pass_at_k_is_the_with_replacement_resampling_of_the_released_script():
    # Simulate the released script: draw k of the n samples with replacement, pass if any is
    # correct; the mean over many draws converges to the paper estimator.
    rng = np.random.default_rng(0)
    n, k = 32, 32
    for c in (1, 2, 5):
        outcomes = np.zeros(n, bool)
        outcomes[:c] = True
        draws = rng.integers(0, n, size=(200_000, k))
        sim = outcomes[draws].any(axis=1).mean()
        assert float(ev.pass_at_k(n, c, k, estimator="paper")) == pytest.approx(sim, abs=4e-3)


def test_summaries_carry_and_use_the_estimator():
    n, c = np.array([32, 32, 32]), np.array([0, 1, 2])
    s = ev.summarize(n, c, 32, estimator="paper", num_resamples=200, seed=1)
    want = (1 - (1 - c / 32) ** 32)
    assert s["pass_at_k"] == pytest.approx(want.mean())
    assert s["pass_at_k_estimator"] == "paper"
    assert s["pass_curve"][0] == pytest.approx((c / 32).mean())  # Pass@1 = accuracy either way
    # The bootstrap interval resamples the paper-estimator values (numpy re-derivation).
    idx = np.random.default_rng(1).integers(0, 3, size=(200, 3))
    assert s["pass_at_k_ci"] == pytest.approx(list(np.quantile(want[idx].mean(1), [0.025, 0.975])))
    assert ev.summarize(n, c, 32)["pass_at_k"] == pytest.approx(2 / 3)
    d = ev.paired_difference((n, c), (n, c + 1), 32, estimator="paper", num_resamples=100)
    assert d["pass_at_k_diff"] == pytest.approx(((1 - (1 - (c + 1) / 32) ** 32) - want).mean())
    assert d["pass_at_k_estimator"] == "paper"
    m = ev.macro_summary([(n, c), (n, c)], 32, estimator="paper", num_resamples=100)
    assert m["pass_at_k"] == pytest.approx(want.mean()) and m["pass_at_k_estimator"] == "paper"
    assert "paper estimator" in ev.format_table({"m": {"b": s}})


def test_avg_at_k_and_pass_curve():
    correct = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]], bool)
    np.testing.assert_allclose(ev.avg_at_k(correct), [0.5, 0.0, 1.0, 0.25])
    n, c = np.full(4, 4), correct.sum(1)
    curve = ev.pass_curve(n, c)
    assert curve.shape == (4,)
    want = [np.mean([brute_pass_at_k(4, int(ci), k) for ci in c]) for k in range(1, 5)]
    np.testing.assert_allclose(curve, want, atol=1e-12)
    assert curve[0] == pytest.approx(ev.avg_at_k(correct).mean())  # Pass@1 = Avg@k
    assert curve[-1] == pytest.approx(0.75)  # 3 of 4 problems solved at least once
    assert np.all(np.diff(curve) >= 0)
    with pytest.raises(ValueError, match="0/1"):
        ev.avg_at_k([[0, 2]])
    with pytest.raises(ValueError, match="samples"):
        ev.avg_at_k([1, 0])


def test_summarize_and_macro():
    n1, c1 = np.full(5, 8), np.array([0, 2, 8, 4, 1])
    n2, c2 = np.full(3, 8), np.array([8, 8, 0])
    s1 = ev.summarize(n1, c1, 8)
    assert s1["num_problems"] == 5 and s1["k"] == 8
    assert s1["avg_at_k"] == pytest.approx(15 / 40)
    assert s1["pass_at_k"] == pytest.approx(4 / 5)
    assert s1["pass_curve"][-1] == pytest.approx(s1["pass_at_k"])
    assert len(s1["pass_curve"]) == 8
    json.dumps(s1)  # JSON-ready
    m = ev.macro_summary([(n1, c1), (n2, c2)], 8)
    assert m["avg_at_k"] == pytest.approx((15 / 40 + 16 / 24) / 2)  # benchmarks weigh the same
    assert m["pass_at_k"] == pytest.approx((4 / 5 + 2 / 3) / 2)
    assert m["num_benchmarks"] == 2 and m["num_problems"] == 8
    for key in ("avg_at_k", "pass_at_k"):
        lo, hi = m[f"{key}_ci"]
        assert lo <= m[key] <= hi


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_estimate_is_deterministic_and_shrinks():
    rng = np.random.default_rng(1)
    widths = []
    for p in (25, 100, 400):
        v = (rng.random(p) < 0.4).astype(float)
        lo, hi = ev.bootstrap_ci(v, seed=3)
        assert lo <= v.mean() <= hi
        assert (lo, hi) == ev.bootstrap_ci(v, seed=3)
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    assert ev.bootstrap_ci([0.7]) == (0.7, 0.7)  # one problem: no spread
    with pytest.raises(ValueError):
        ev.bootstrap_ci([])
    with pytest.raises(ValueError, match="confidence"):
        ev.bootstrap_ci([0.1, 0.2], confidence=1.5)


def test_bootstrap_ci_agrees_with_scipy_and_the_normal_approximation():
    rng = np.random.default_rng(2)
    v = rng.beta(0.5, 0.8, size=300)  # per-problem Avg@k-like values
    lo, hi = ev.bootstrap_ci(v, num_resamples=20000, seed=0)
    ref = scipy.stats.bootstrap((v,), np.mean, n_resamples=20000, method="percentile",
                                confidence_level=0.95, rng=np.random.default_rng(5))
    assert lo == pytest.approx(ref.confidence_interval.low, abs=4e-3)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=4e-3)
    half = 1.959964 * v.std(ddof=0) / math.sqrt(v.size)
    assert lo == pytest.approx(v.mean() - half, abs=6e-3)
    assert hi == pytest.approx(v.mean() + half, abs=6e-3)


def test_macro_ci_is_stratified():
    # Two benchmarks of very different size: the macro CI's half-width follows
    # sqrt(var_a / n_a + var_b / n_b) / 2 (each benchmark resampled within itself).
    rng = np.random.default_rng(4)
    a, b = rng.random(30), rng.random(600)
    lo, hi = ev.macro_ci([a, b], num_resamples=20000)
    point = (a.mean() + b.mean()) / 2
    half = 1.959964 * math.sqrt(a.var() / a.size + b.var() / b.size) / 2
    assert lo == pytest.approx(point - half, abs=5e-3)
    assert hi == pytest.approx(point + half, abs=5e-3)


# ----------------------------------------------------------------------------- output


def test_paired_difference_resamples_problems_jointly():
    rng = np.random.default_rng(3)
    n = np.full(200, 16)
    easy = rng.uniform(size=200)  # shared difficulty: both models find the same problems easy
    c_base = rng.binomial(16, easy * 0.8)
    c_other = np.minimum(16, c_base + rng.binomial(2, 0.5, size=200))
    d = ev.paired_difference((n, c_base), (n, c_other), 4, num_resamples=500, seed=7)
    diff = c_other / 16 - c_base / 16
    assert d["avg_at_k_diff"] == pytest.approx(diff.mean())
    assert d["pass_at_k_diff"] == pytest.approx(
        (ev.pass_at_k(n, c_other, 4) - ev.pass_at_k(n, c_base, 4)).mean())
    assert (d["wins"], d["losses"]) == (int((diff > 0).sum()), int((diff < 0).sum()))
    # Re-derivation: one index draw per resample, applied to both models.
    idx = np.random.default_rng(7).integers(0, 200, size=(500, 200))
    means = (c_other / 16)[idx].mean(1) - (c_base / 16)[idx].mean(1)
    assert d["avg_at_k_diff_ci"] == pytest.approx(list(np.quantile(means, [0.025, 0.975])))
    # Shared difficulty cancels: the paired interval is far tighter than the separate ones.
    lo_b, hi_b = ev.bootstrap_ci(c_base / 16)
    lo, hi = d["avg_at_k_diff_ci"]
    assert hi - lo < 0.5 * (hi_b - lo_b) and lo > 0
    with pytest.raises(ValueError, match="same problems"):
        ev.paired_difference((n, c_base), (n[:10], c_other[:10]), 4)


def test_plot_is_a_png(tmp_path):
    import matplotlib.image

    path = ev.plot_pass_curves({"a / bench": ev.pass_curve([8] * 3, [0, 1, 5]).tolist(),
                                "b / bench": [0.1, 0.2]}, tmp_path / "sub" / "p.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    with pytest.raises(ValueError, match="no curves"):
        ev.plot_pass_curves({}, tmp_path / "q.png")


def test_format_table_and_clip_text():
    s = ev.summarize([4, 4], [1, 4], 4)
    table = ev.format_table({"m1": {"toy": s}, "m2": {"toy": s, "other": s}},
                            {"m2": ev.macro_summary([([4, 4], [1, 4])] * 2, 4)})
    lines = table.splitlines()
    assert "Avg@4" in lines[0] and "95% CI" in lines[0]
    assert lines[1].split()[2:] == ["m1", "m2"]
    row = next(line for line in lines if line.startswith("toy (2)"))
    assert row.count(f"{100 * s['avg_at_k']:.1f}") == 2 and "100.0" in row  # pass@4 = 1
    assert any(line.startswith("other (2)") and " - " in line for line in lines)
    assert lines[-1].startswith("macro average (2)")
    assert ev.clip_text("abc", 10) == "abc" and ev.clip_text("abc", 0) == ""
    clipped = ev.clip_text("x" * 50 + "ANSWER", 20)
    assert clipped.endswith("ANSWER") and "characters cut" in clipped


# ----------------------------------------------------------------------------- the loop

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# The verifier grades the final number of each response (mode "final_number"), so a random
# model's output ending on some digit can be made correct (test_evaluate_on_a_tiny_checkpoint).
VOCAB = 320  # the 256 byte-level symbols, the specials and a few merges
PROBLEMS = [("What is 1 + 2?", "3"), ("What is 2 + 2?", "4"), ("Compute 7 - 2.", "5"),
            ("Compute 3 * 3.", "9"), ("What is 8 - 7?", "1")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Qwen3 checkpoint (vocab 320) with a BPE tokenizer trained here (ids 0, 1, 2
    = pad, bos, eos as in the model config) and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    from tests.tiny_hf import make_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny") / "model"
    make_tiny_checkpoint(path, "qwen3", tie_word_embeddings=True, vocab_size=VOCAB)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [f"{q} {a}" for q, a in PROBLEMS] * 10 + [
        "Please reason step by step, and put your final answer within \\boxed{}.",
        "0 1 2 3 4 5 6 7 8 9 the answer is"] * 10
    tok.train_from_iterator(corpus, trainer)
    assert tok.get_vocab_size() <= VOCAB
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    assert (fast.pad_token_id, fast.bos_token_id, fast.eos_token_id) == (0, 1, 2)
    return str(path)


def _examples():
    from scope_jax.data import Example

    return [Example(problem=q, answer=a, source=f"toy:{i}") for i, (q, a) in enumerate(PROBLEMS)]


def _check_records(records, examples, k, max_new, mode="final_number"):
    """Structure of the records, and every reward re-derived with the in-process verifier."""
    from scope_jax.verifiers.math import verify

    assert [r["index"] for r in records] == list(range(len(examples)))
    for r, ex in zip(records, examples):
        assert r["source"] == ex.source and r["gold"] == ex.answer
        assert r["n"] == k
        for key in ("rewards", "reasons", "extracted", "lengths", "finish", "responses"):
            assert len(r[key]) == k, key
        assert r["c"] == sum(r["rewards"]) and r["avg"] == r["c"] / k
        assert all(1 <= n <= max_new for n in r["lengths"])
        assert all(f == "eos" or n == max_new for f, n in zip(r["finish"], r["lengths"]))
        # Decoded without special tokens (the EOS that ended a response is not in its text).
        assert not any(t in text for text in r["responses"] for t in ("</s>", "<pad>", "<s>"))
        for text, reward, reason, extracted in zip(r["responses"], r["rewards"], r["reasons"],
                                                   r["extracted"]):
            ref = verify(text, ex.answer, mode=mode)
            assert (reward, reason, extracted) == (ref.reward, ref.reason, ref.extracted)


def test_evaluate_on_a_tiny_checkpoint(checkpoint):
    import transformers

    from scope_jax.models import load_hf

    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    model = load_hf(checkpoint)
    examples = _examples()
    kw = dict(k=4, max_new_tokens=12, batch_prompts=2, verifier_mode="final_number",
              verifier_workers=2, keep_response_chars=10**6, num_resamples=200)
    res = ev.evaluate(model, tokenizer, examples, ev.EvalSettings(seed=0, **kw))
    # 5 prompts in batches of 2: the last batch is topped up, and its extra samples dropped.
    _check_records(res.records, examples, k=4, max_new=12)
    with_instruction = [len(tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{ex.problem}\n{PAPER_INSTRUCTION}"}],
        add_generation_prompt=True, tokenize=True)["input_ids"]) for ex in examples]
    assert [r["prompt_tokens"] for r in res.records] == with_instruction
    rewards = [x for r in res.records for x in r["rewards"]]
    s = res.summary
    assert s["avg_at_k"] == pytest.approx(np.mean(rewards))
    want_pass = np.mean([brute_pass_at_k(4, r["c"], 4) for r in res.records])
    assert s["pass_at_k"] == pytest.approx(want_pass)
    assert s["num_problems"] == 5 and s["num_dropped"] == 0 and s["k"] == 4
    assert sum(s["reasons"].values()) == 20
    assert s["settings"]["eos_ids"] == [2] and s["settings"]["top_k"] == ev.PAPER_TOP_K
    # A random model is rarely right, so make it right: the same seed reproduces every sample
    # (golds do not enter the prompt), and with each problem's gold set to a number its first
    # sample ended on, that sample must now be scored correct by the verifier.
    golds = {r["index"]: next((x for x in r["extracted"] if x is not None), None)
             for r in res.records}
    assert any(g is not None for g in golds.values()), "no sample ended on a number"
    swapped = [dataclasses.replace(ex, answer=golds[i] or ex.answer)
               for i, ex in enumerate(examples)]
    again = ev.evaluate(model, tokenizer, swapped, ev.EvalSettings(seed=0, **kw))
    assert [r["responses"] for r in again.records] == [r["responses"] for r in res.records]
    _check_records(again.records, swapped, k=4, max_new=12)
    for r in again.records:
        if golds[r["index"]] is not None:
            assert r["c"] >= 1 and r["pass_at_k"] == 1.0
    assert again.summary["avg_at_k"] > s["avg_at_k"]
    other = ev.evaluate(model, tokenizer, examples, ev.EvalSettings(seed=1, **kw))
    assert [r["responses"] for r in other.records] != [r["responses"] for r in res.records]
    # Overlong prompts are dropped, counted and named, never truncated.
    from scope_jax.data import Example

    long = Example(problem="What is 1 + 2? " * 30, answer="3", source="long")
    short = ev.evaluate(model, tokenizer, examples[:2] + [long], ev.EvalSettings(seed=0, max_prompt_len=60, **kw))
    assert short.summary["num_dropped"] == 1 and short.summary["dropped"] == ["long"]
    assert [r["source"] for r in short.records] == ["toy:0", "toy:1"]


def test_evaluate_on_a_mesh_matches_one_device(checkpoint):
    import transformers

    from scope_jax import sharding as shd
    from scope_jax.models import load_hf

    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    kw = dict(k=4, max_new_tokens=8, batch_prompts=3, verifier_workers=1, num_resamples=100,
              seed=5, verifier_mode="final_number")
    examples = _examples()[:3]
    one = ev.evaluate(load_hf(checkpoint), tokenizer, examples, ev.EvalSettings(**kw))
    sharded = ev.evaluate(load_hf(checkpoint, mesh=mesh), tokenizer, examples, ev.EvalSettings(**kw), mesh=mesh)
    assert sharded.records == one.records


def test_tools_eval_end_to_end(checkpoint, tmp_path, capsys):
    import transformers

    from tools import eval as eval_tool

    data = tmp_path / "toy_test.jsonl"
    with open(data, "w") as f:
        for q, a in PROBLEMS:
            f.write(json.dumps({"problem": q, "answer": a}) + "\n")
    out = tmp_path / "out"
    common = ["--data", str(data), "--k", "4", "--max-new-tokens", "12", "--limit", "3",
              "--batch-prompts", "4", "--verifier-mode", "final_number",
              "--verifier-workers", "2", "--keep-response-chars", "1000000",
              "--num-resamples", "200", "--out", str(out)]
    with pytest.raises(SystemExit, match="--fields"):
        eval_tool.main(["--model", checkpoint] + common)
    for bad in ("nosuch", "problem,answer,nokind", "a,"):
        with pytest.raises(SystemExit, match="--fields"):
            eval_tool.main(["--model", checkpoint, "--fields", bad] + common)
    argv = ["--model", f"a={checkpoint}", "--model", f"b={checkpoint}",
            "--data", f"copy={data}", "--fields", "problem,answer", "--seed", "0",
            "--no-instruction"] + common
    assert eval_tool.main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) == {"a", "b"}
    assert set(results["results"]["a"]) == {"toy_test", "copy"}
    assert set(results["macro"]) == {"a", "b"}
    # Same checkpoint, same seed: both model names give identical numbers and samples.
    timing = ("seconds", "generate_seconds", "tokens_per_second")
    for bench in ("toy_test", "copy"):
        a, b = (({k: v for k, v in results["results"][m][bench].items() if k not in timing})
                for m in ("a", "b"))
        assert a == b
        assert (out / "a" / f"{bench}.jsonl").read_text() == \
            (out / "b" / f"{bench}.jsonl").read_text()
    examples = _examples()[:3]
    for model in ("a", "b"):
        for bench in ("toy_test", "copy"):
            lines = (out / model / f"{bench}.jsonl").read_text().splitlines()
            records = [json.loads(line) for line in lines]
            summary = results["results"][model][bench]
            assert summary["num_problems"] == 3 and summary["k"] == 4
            assert summary["avg_at_k"] == pytest.approx(np.mean([r["c"] / 4 for r in records]))
            # TensorBoard events, one run per model (read back by tensorboard itself)
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

            acc = EventAccumulator(str(out / model))
            acc.Reload()
            assert [e.value for e in acc.Scalars(f"{bench}/avg_at_k")] == [pytest.approx(summary["avg_at_k"])]
            tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
            for r, ex in zip(records, examples):
                assert r["problem"] == ex.problem
                bare = tokenizer.apply_chat_template([{"role": "user", "content": ex.problem}],
                                                     add_generation_prompt=True, tokenize=True)
                assert r["prompt_tokens"] == len(bare["input_ids"])  # --no-instruction
            # The source each record must carry: the file and its 1-based line.
            sources = [dataclasses.replace(ex, source=f"{data}:{i + 1}") for i, ex in enumerate(examples)]
            _check_records(records, sources, k=4, max_new=12)
    with open(out / "pass_at_k.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "macro average (2)" in printed and "pass_at_k.png" in printed
    assert (out / "table.txt").read_text().strip() in printed


def test_tools_eval_resolves_benchmark_names(tmp_path, monkeypatch):
    import importlib

    import scope_jax
    from tools import eval as eval_tool

    monkeypatch.delenv("SCOPE_DATA_DIR", raising=False)
    eval_tool = importlib.reload(eval_tool)
    package_dir = os.path.dirname(scope_jax.__file__)

    (tmp_path / "gsm8k_test.jsonl").write_text("{}\n")
    assert eval_tool.resolve_data("gsm8k", str(tmp_path)) == ("gsm8k",
                                                              str(tmp_path / "gsm8k_test.jsonl"))
    assert eval_tool.resolve_data("x=gsm8k", str(tmp_path))[0] == "x"
    with pytest.raises(SystemExit, match="known there"):
        eval_tool.resolve_data("math500", str(tmp_path))
    # The benchmarks shipped in the package are the default (a plain clone needs nothing else).
    for name in ("math500", "aime24", "aime25", "amc23", "minerva_math", "olympiadbench", "gsm8k"):
        label, path = eval_tool.resolve_data(name, eval_tool.DEFAULT_DATA_DIR)
        assert label == name and os.path.isfile(path) and path.startswith(package_dir), path
    args = eval_tool.build_parser().parse_args(["--model", "m", "--benchmarks", "math500", "--out", "o"])
    assert args.data == ["math500"] and args.data_dir == eval_tool.DEFAULT_DATA_DIR
    with pytest.raises(SystemExit, match="config.json"):
        eval_tool.resolve_model(str(tmp_path))


def test_hierarchical_bootstrap_matches_the_two_stage_variance():
    # Two-stage bootstrap of the mean of S seed means: its variance is
    # (1/S) * [population variance of the seed means + mean over seeds of var_s / P_s].
    rng = np.random.default_rng(11)
    seeds = [rng.normal(mu, sd, size=p) for mu, sd, p in
             ((0.10, 0.3, 150), (0.02, 0.5, 200), (0.07, 0.2, 120), (0.15, 0.4, 180))]
    m = np.array([v.mean() for v in seeds])
    within = np.mean([v.var() / v.size for v in seeds])
    half = 1.959964 * math.sqrt((m.var() + within) / len(seeds))
    lo, hi = ev.hierarchical_bootstrap_ci(seeds, num_resamples=20000, seed=3)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.08)
    assert (lo + hi) / 2 == pytest.approx(m.mean(), abs=0.15 * half)
    # One seed: the ordinary bootstrap over problems.
    lo1, hi1 = ev.hierarchical_bootstrap_ci(seeds[:1], num_resamples=20000, seed=3)
    blo, bhi = ev.bootstrap_ci(seeds[0], num_resamples=20000, seed=4)
    assert lo1 == pytest.approx(blo, abs=0.01) and hi1 == pytest.approx(bhi, abs=0.01)
    # No within-seed spread: a pure bootstrap over the seed means (numpy re-derivation).
    flat = [np.full(50, x) for x in (0.0, 0.1, 0.3)]
    lo2, hi2 = ev.hierarchical_bootstrap_ci(flat, num_resamples=20000, seed=5)
    draws = np.array([0.0, 0.1, 0.3])[np.random.default_rng(6).integers(0, 3, (20000, 3))].mean(1)
    assert (lo2, hi2) == pytest.approx(tuple(np.quantile(draws, [0.025, 0.975])), abs=0.012)
    with pytest.raises(ValueError, match="non-empty"):
        ev.hierarchical_bootstrap_ci([np.zeros(3), np.zeros(0)])


def test_pooled_difference_and_summary_pool_seeds():
    rng = np.random.default_rng(8)
    pairs, counts = [], []
    for s, p in enumerate((40, 60, 50)):
        n = np.full(p, 8)
        cb = rng.binomial(8, 0.3, size=p)
        co = np.minimum(8, cb + rng.binomial(1, 0.3 + 0.1 * s, size=p))
        pairs.append(((n, cb), (n, co)))
        counts.append((n, co))
    d = ev.pooled_difference(pairs, 8, num_resamples=400, estimator="paper")
    per = [ev.paired_difference(b, o, 8, estimator="paper") for b, o in pairs]
    assert d["avg_at_k_diff_per_seed"] == pytest.approx([x["avg_at_k_diff"] for x in per])
    assert d["avg_at_k_diff"] == pytest.approx(np.mean([x["avg_at_k_diff"] for x in per]))
    assert d["pass_at_k_diff"] == pytest.approx(np.mean([x["pass_at_k_diff"] for x in per]))
    assert d["wins"] == sum(x["wins"] for x in per) and d["seeds_better"] == 3
    lo, hi = d["avg_at_k_diff_ci"]
    assert lo < d["avg_at_k_diff"] < hi
    sm = ev.pooled_summary(counts, 8, num_resamples=400)
    assert sm["avg_at_k_per_seed"] == pytest.approx([(c / 8).mean() for _, c in counts])
    assert sm["num_seeds"] == 3 and sm["num_problems"] == 150
    with pytest.raises(ValueError, match="seed 1"):
        ev.pooled_difference([pairs[0], ((np.full(3, 8), np.zeros(3, int)), pairs[1][1])], 8)


def test_paper_pass_at_k_refuses_k_above_n_like_the_released_script():
    # Issue 22: the released script refuses k > n; so does estimator="paper", for scalars and
    # for arrays where any one problem has fewer than k samples, and it names the smallest n.
    with pytest.raises(ValueError, match="min n is 3"):
        ev.pass_at_k(np.array([8, 3, 8]), np.array([1, 1, 1]), 4, estimator="paper")
    with pytest.raises(ValueError, match="at least k samples"):
        ev.pass_curve(np.array([4, 4]), np.array([1, 2]), max_k=5, estimator="paper")
    # k == n is the edge that stays allowed: 1 - (1 - c/n)^n by hand.
    got = ev.pass_at_k(np.array([4, 4]), np.array([1, 3]), 4, estimator="paper")
    np.testing.assert_allclose(got, [1 - 0.75 ** 4, 1 - 0.25 ** 4])
