"""The toy task (scope_jax/toy.py) and its builder (tools/make_toy.py).

The worked solutions are checked against this file's own expression parser (no eval); the
built checkpoints are checked against transformers (logits and greedy generations).
"""

import dataclasses
import json
import os
import re
import shutil

import numpy as np
import pytest
from hypothesis import given, settings as hyp_settings, strategies as st

from scope_jax import data, toy
from scope_jax.data import build_prompt, load_examples

# ------------------------------------------------------------------------------ reference parser


def _lex(text):
    tokens = re.findall(r"\d+|[-+*()]", text)
    if "".join(tokens) != text:
        raise ValueError(f"unexpected characters in {text!r}")
    return tokens


def _evaluate(text):
    """Value of an expression of non-negative integers, + - * and parentheses, with the usual
    precedence (recursive descent)."""
    tokens, pos = _lex(text), 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def factor():
        tok = take()
        if tok == "(":
            value = expr()
            assert take() == ")"
            return value
        assert tok.isdigit(), tok
        return int(tok)

    def term():
        value = factor()
        while peek() == "*":
            take()
            value *= factor()
        return value

    def expr():
        value = term()
        while peek() in ("+", "-"):
            if take() == "+":
                value += term()
            else:
                value -= term()
        return value

    value = expr()
    assert pos == len(tokens), f"trailing tokens in {text!r}"
    return value


def test_reference_parser():
    assert _evaluate("(7+5)*3-4") == 32
    assert _evaluate("7+5*3-4") == 18
    assert _evaluate("2*(3+4)*5") == 70
    assert _evaluate("10-3-2") == 5


_STEP = re.compile(r"(\d+)([-+*])(\d+)=(\d+)\.")


@pytest.mark.parametrize("difficulty", [toy.Difficulty(),
                                        toy.Difficulty(min_ops=1, max_ops=5, max_operand=20,
                                                       max_value=500, max_factor=20),
                                        toy.Difficulty(ops="+-", max_value=30)])
def test_worked_solutions_are_correct(difficulty):
    for e in toy.make_examples(400, seed=7, difficulty=difficulty):
        m = re.fullmatch(r"Compute (.+)\.", e["problem"])
        assert m, e
        expr = m.group(1)
        assert _evaluate(expr) == int(e["answer"]), e
        numbers = [int(x) for x in re.findall(r"\d+", expr)]
        *steps, boxed = e["solution"].split(" ")
        assert boxed == f"\\boxed{{{e['answer']}}}", e
        assert difficulty.min_ops <= len(steps) <= difficulty.max_ops
        assert len(numbers) == len(steps) + 1
        value = numbers[0]
        for k, step in enumerate(steps):
            s = _STEP.fullmatch(step)
            assert s, (step, e)
            a, op, b, c = int(s.group(1)), s.group(2), int(s.group(3)), int(s.group(4))
            assert (a, b) == (value, numbers[k + 1]), e  # left to right through the problem
            assert op in difficulty.ops
            assert c == {"+": a + b, "-": a - b, "*": a * b}[op], e
            assert 0 <= c <= difficulty.max_value
            assert 1 <= b <= difficulty.max_operand
            if op == "*":
                assert a <= difficulty.max_factor and b <= difficulty.max_factor
            value = c
        assert value == int(e["answer"])


def test_generator_is_deterministic():
    a = toy.make_examples(100, seed=3)
    assert a == toy.make_examples(100, seed=3)
    assert a[:10] == toy.make_examples(10, seed=3)
    assert a != toy.make_examples(100, seed=4)
    assert all(set(e) == {"problem", "answer", "solution"} for e in a)
    train, test = toy.split_examples(300, 50, seed=3)
    assert (train, test) == toy.split_examples(300, 50, seed=3)
    assert not {e["problem"] for e in train} & {e["problem"] for e in test}
    assert len(train) == 300 and len(test) == 50


def test_difficulty_validation():
    with pytest.raises(ValueError, match="min_ops"):
        toy.Difficulty(min_ops=3, max_ops=2)
    with pytest.raises(ValueError, match="ops"):
        toy.Difficulty(ops="+/")
    with pytest.raises(ValueError, match="max_value"):
        toy.Difficulty(max_operand=9, max_value=5)


def test_jsonl_loads_with_the_data_pipeline(tmp_path):
    examples = toy.make_examples(20, seed=1)
    path = data.write_jsonl(tmp_path / "d" / "train.jsonl", examples)
    loaded = load_examples(path, spec=toy.TOY_SPEC)
    assert [(x.problem, x.answer, x.meta["solution"]) for x in loaded] == [
        (e["problem"], e["answer"], e["solution"]) for e in examples]
    assert loaded[3].source.endswith("train.jsonl:4")


# ------------------------------------------------------------------------------ tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return toy.train_tokenizer(toy.tokenizer_corpus(toy.make_examples(500, seed=11)))


def test_tokenizer_round_trips_task_strings(tokenizer):
    examples = toy.make_examples(300, seed=12, difficulty=toy.Difficulty(max_ops=5, max_value=999))
    for e in examples:
        for text in (e["problem"], e["solution"], toy.prompt_text(e["problem"], tokenizer)):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.decode(ids) == text
        # digits are always single tokens (numbers are spelled digit by digit)
        tokens = tokenizer.convert_ids_to_tokens(
            tokenizer(e["solution"], add_special_tokens=False)["input_ids"])
        assert all(len(t) == 1 for t in tokens if any(ch.isdigit() for ch in t)), tokens


@hyp_settings(max_examples=150, deadline=None)
@given(st.text(max_size=40))
def test_tokenizer_round_trips_any_text(text):
    tok = _shared_tokenizer()
    if any(s in text for s in toy.SPECIAL_TOKENS):
        return
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


_TOK = []


def _shared_tokenizer():  # hypothesis tests cannot take function-scoped fixtures
    if not _TOK:
        _TOK.append(toy.train_tokenizer(toy.tokenizer_corpus(toy.make_examples(200, seed=5))))
    return _TOK[0]


def test_special_tokens_and_chat_template(tokenizer, tmp_path):
    assert [tokenizer.convert_tokens_to_ids(s) for s in toy.SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 3
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == 0
    assert tokenizer.bos_token is None
    text = build_prompt("Compute 1+2.", tokenizer, instruction=toy.TOY_INSTRUCTION)
    assert text == "<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n"
    two_turns = tokenizer.apply_chat_template(
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], tokenize=False)
    assert two_turns == "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 2 and ids.count(2) == 2 and ids.count(3) == 1  # specials are single tokens

    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    assert build_prompt("Compute 1+2.", again, instruction=toy.TOY_INSTRUCTION) == text
    assert again.eos_token_id == 3 and again.pad_token_id == 0


def test_encode_sft_masks_exactly_the_response(tokenizer):
    examples = toy.make_examples(8, seed=2)
    ids, attn, resp = toy.encode_sft(examples, tokenizer)
    assert ids.dtype == np.int32 and ids.shape == attn.shape == resp.shape
    for i, e in enumerate(examples):
        n = int(attn[i].sum())
        assert attn[i, :n].all() and not attn[i, n:].any()  # right padding
        assert (ids[i, n:] == tokenizer.pad_token_id).all()
        assert tokenizer.decode(ids[i, resp[i]]) == e["solution"] + "<|im_end|>"
        start = int(resp[i].argmax())
        assert resp[i, start:n].all() and not resp[i, n:].any()
        assert tokenizer.decode(ids[i, :start]) == toy.prompt_text(e["problem"], tokenizer)
    with pytest.raises(ValueError, match="length"):
        toy.encode_sft(examples, tokenizer, length=10)


# ------------------------------------------------------------------------------ training / build


def test_sft_loss_falls_on_a_fixed_batch(tokenizer):
    from flax import nnx

    from scope_jax.models import Transformer

    ids, attn, resp = toy.encode_sft(toy.make_examples(16, seed=4), tokenizer)
    size = toy.ModelSize(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                         intermediate_size=64)
    model = Transformer(toy.model_config(size, tokenizer), rngs=nnx.Rngs(0))
    out = toy.sft_train(model, ids, attn, resp, steps=60, batch_size=16, lr=1e-2, warmup=5,
                        seed=0)
    assert np.isfinite(out["losses"]).all()
    # random init: about log(V) nats per token; the same 16 sequences are memorised fast
    assert out["losses"][0] > 4.0 and out["losses"][-1] < 0.5 * out["losses"][0]


_TINY = toy.ToySettings(
    n_train=128, n_test=8,
    teacher=toy.TrainSettings(toy.ModelSize(32, 2, 2, 1, 64), steps=12, batch_size=16, seed=1),
    student=toy.TrainSettings(toy.ModelSize(32, 1, 2, 1, 64), steps=6, batch_size=16, seed=2),
    eval_temperatures=(1.0,), eval_samples=2, max_new_tokens=12)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    return toy.build_toy(out, settings=_TINY, verbose=False)


def test_build_toy_writes_loadable_checkpoints(built):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scope_jax.models import load_hf

    with open(built["manifest"]) as f:
        manifest = json.load(f)
    assert manifest["settings"]["teacher"]["steps"] == 12
    for name in ("teacher", "student"):
        acc = manifest["accuracy"][name]
        assert set(acc) == {"greedy", "T=1.0"} and all(0.0 <= v <= 1.0 for v in acc.values())
    assert manifest["models"]["teacher"]["parameters"] > manifest["models"]["student"]["parameters"]
    test = load_examples(built["test"], spec=toy.TOY_SPEC)
    assert len(test) == 8 and len(load_examples(built["train"], spec=toy.TOY_SPEC)) == 128

    for name in ("teacher", "student"):
        path = built[name]
        tok = AutoTokenizer.from_pretrained(path)
        assert tok.chat_template == toy.CHAT_TEMPLATE and tok.eos_token_id == 3
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        assert hf.config.model_type == "qwen3" and hf.config.tie_word_embeddings
        ids, attn, _ = toy.encode_sft([{"problem": e.problem, "solution": "1+2=3. \\boxed{3}"}
                                       for e in test], tok)
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor(ids, dtype=torch.long),
                     attention_mask=torch.tensor(attn, dtype=torch.long)).logits.numpy()
        ours = np.asarray(load_hf(path)(ids, attention_mask=attn))
        np.testing.assert_allclose(ours[attn], ref[attn], atol=1e-4, rtol=1e-4)


def test_evaluate_matches_transformers_greedy_generation(built):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scope_jax.models import load_hf

    path = built["teacher"]
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    examples = [json.loads(line) for line in open(built["test"])]
    result = toy.evaluate(load_hf(path), tok, examples, max_new_tokens=12)
    for e, ours in zip(examples, result["responses"]):
        prompt = tok(toy.prompt_text(e["problem"], tok), add_special_tokens=False,
                     return_tensors="pt")
        with torch.no_grad():
            out = hf.generate(**prompt, max_new_tokens=12, do_sample=False, eos_token_id=3,
                              pad_token_id=0)
        ref = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
        assert ours == ref


def test_build_toy_reuses_and_refuses_other_settings(built):
    mtime = os.path.getmtime(built["manifest"])
    out = built["dir"]
    assert toy.build_toy(out, settings=_TINY, verbose=False) == built
    assert os.path.getmtime(built["manifest"]) == mtime  # nothing was rebuilt
    other = dataclasses.replace(_TINY, n_test=9)
    with pytest.raises(ValueError, match="other settings"):
        toy.build_toy(out, settings=other, verbose=False)


def test_build_toy_force_rebuilds_an_incomplete_build(tmp_path):
    first = dataclasses.replace(_TINY, n_train=64, n_test=4)
    paths = toy.build_toy(tmp_path, settings=first, verbose=False)
    (tmp_path / "unrelated.txt").write_text("kept")
    shutil.rmtree(paths["student"])  # e.g. deleted by hand
    with pytest.raises(ValueError, match="incomplete"):
        toy.build_toy(tmp_path, settings=first, verbose=False)
    toy.build_toy(tmp_path, settings=_TINY, force=True, verbose=False)
    with open(paths["manifest"]) as f:
        assert json.load(f)["settings"]["n_test"] == _TINY.n_test
    assert len(load_examples(paths["test"], spec=toy.TOY_SPEC)) == _TINY.n_test
    assert os.path.isfile(os.path.join(paths["student"], "model.safetensors"))
    assert (tmp_path / "unrelated.txt").read_text() == "kept"


def test_make_toy_cli_rejects_bad_steps(capsys):
    from tools import make_toy

    with pytest.raises(SystemExit):
        make_toy.main(["--out", "unused", "--teacher-steps", "0"])
    assert "--teacher-steps must be >= 1" in capsys.readouterr().err


def test_training_mix_keeps_a_seeded_fraction_of_the_problems_with_an_op():
    examples = toy.make_examples(4000, seed=3)
    ts = toy.TrainSettings(toy.STUDENT_SIZE, steps=1, seed=5, op_keep=(("*", 0.1),))
    keep = toy.training_mix(examples, ts)
    kept = [examples[i] for i in keep]
    with_op = [e for e in examples if "*" in e["problem"]]
    # Every problem without a product is kept; about 10% of those with one.
    assert sum("*" not in e["problem"] for e in kept) == len(examples) - len(with_op)
    frac = sum("*" in e["problem"] for e in kept) / len(with_op)
    assert abs(frac - 0.1) < 3 * (0.1 * 0.9 / len(with_op)) ** 0.5
    assert toy.training_mix(examples, ts) == keep  # seeded
    assert toy.training_mix(examples, toy.TrainSettings(toy.STUDENT_SIZE, steps=1)) == list(range(4000))
    with pytest.raises(ValueError, match="op_keep"):
        toy.TrainSettings(toy.STUDENT_SIZE, steps=1, op_keep=(("/", 0.5),))


def test_toy_settings_families_and_seeds():
    assert toy.toy_settings("toy", 0) == toy.ToySettings()  # seed 0: the existing build
    b1, b2 = toy.toy_settings("blindspot", 1), toy.toy_settings("blindspot", 2)
    assert b1.teacher.op_keep == (("*", 0.05),) and toy.toy_settings("toy", 1).teacher.op_keep == ()
    seeds = lambda s: (s.seed, s.teacher.seed, s.student.seed)
    assert len({seeds(b1), seeds(b2), seeds(toy.toy_settings("blindspot", 0))}) == 3
    with pytest.raises(ValueError, match="unknown toy family"):
        toy.toy_settings("nope")
    # Builds made before the training-mix knobs existed keep matching the default settings.
    d = toy._settings_dict(toy.ToySettings())
    assert "op_keep" not in d["teacher"] and "op_noise" not in d["student"]
    assert toy._settings_dict(b1)["teacher"]["op_keep"] == [["*", 0.05]]


def test_build_records_training_mix_and_per_op_accuracy(built):
    with open(built["manifest"]) as f:
        manifest = json.load(f)
    assert manifest["models"]["teacher"]["training_problems"] == 128
    assert set(manifest["machine"]) >= {"cpu_model", "jax", "xla_flags"}
    by_op = manifest["greedy_accuracy_by_op"]["student"]
    test = load_examples(built["test"], spec=toy.TOY_SPEC)
    if any("*" in e.problem for e in test) and any("*" not in e.problem for e in test):
        n = sum("*" in e.problem for e in test)
        # the overall greedy accuracy is the problem-weighted mix of the two
        mix = (by_op["with *"] * n + by_op["without *"] * (len(test) - n)) / len(test)
        assert mix == pytest.approx(manifest["accuracy"]["student"]["greedy"])


def test_premise_tool_on_a_tiny_build(built, tmp_path):
    from tools import premise

    res = premise.measure(os.path.dirname(built["manifest"]), problems=4, samples=2,
                          continuations=2, max_new_tokens=12, chunk=8)
    assert 0.0 <= res["mixed_prompts"] <= 1.0
    assert res["mixed_prompts"] + res["all_correct_prompts"] + res["all_wrong_prompts"] == pytest.approx(1.0)
    assert res["wrong_rollouts"] == round(8 * (1 - res["student_accuracy"]))
    rows = res["recovery_by_quartile"]
    assert sum(r["n"] for r in rows) == res["wrong_rollouts"]
    assert "paper (Q1 -> Q4)" in premise.format_result(res)
    # Step 4: the weights' summaries (a path with >= 2 rollouts in some group, or none).
    for key in ("correct_path_student", "wrong_path_teacher"):
        w = res["weights"][key]
        assert w["groups"] == 0 or 1.0 <= w["ess"] <= w["n"] + 1e-6
    assert res["weights"]["tau"] == 1.0 and "ESS / n" in premise.format_result(res)
    # Weights only (no continuations): the per-prompt ESS / n the study's analysis bins by.
    only = premise.measure(os.path.dirname(built["manifest"]), problems=4, samples=3,
                           continuations=0, max_new_tokens=12, split="test")
    pp = only["weights"]["per_prompt"]
    assert pp["problem"] == [0, 1, 2, 3] and "recovery_by_quartile" not in only
    assert only["settings"]["continuations"] == 0 and only["settings"]["fractions"] == []
    for c, wrong, right in zip(pp["correct"], pp["wrong_ess_over_n"], pp["correct_ess_over_n"]):
        assert (wrong is None) == (3 - c < 2) and (right is None) == (c < 2)
        assert all(x is None or 1 / 3 - 1e-6 <= x <= 1 + 1e-6 for x in (wrong, right))
    ratios = [x for x in pp["wrong_ess_over_n"] if x is not None]
    if ratios:  # the summary's mean ESS / n is the mean of the per-prompt ratios
        assert only["weights"]["wrong_path_teacher"]["ess_over_n"] == pytest.approx(np.mean(ratios))


def test_prompt_ess_ratio_per_prompt():
    from tools import premise

    groups = np.repeat(np.arange(3), 4)
    w = np.array([1, 1, 1, 1, 2, 0, 0, 2, 1, 3, 5, 7], np.float64)
    select = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], bool)  # prompt 2: one row on the path
    got = premise.prompt_ess_ratio(w, groups, select, 3)
    assert got[0] == 1.0 and got[1] == pytest.approx((4 ** 2 / 8) / 4) and np.isnan(got[2])


def test_premise_quartiles_cuts_and_recovery_table():
    from tools import premise

    ppl = np.array([5.0, 1.0, 3.0, 2.0, 8.0, 4.0, 7.0, 6.0])
    assert premise.quartiles(ppl).tolist() == [2, 0, 1, 0, 3, 1, 3, 2]
    assert [premise.cut_point(10, f) for f in premise.FRACTIONS] == [2, 4, 6, 8]
    assert premise.cut_point(1, 0.2) == 1 and premise.cut_point(3, 0.8) == 2
    rec = np.array([[1.0, 0.5], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0],
                    [0.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.0, 0.0]])
    rows = premise.recovery_table(ppl, rec)
    assert [r["n"] for r in rows] == [2, 2, 2, 2]
    assert rows[0]["recovery"] == [1.0, 0.5] and rows[0]["mean_ppl"] == 1.5  # ppl 1 and 2
    assert rows[3]["recovery"] == [0.0, 0.5]  # ppl 7 and 8
    sub = premise.recovery_table(ppl, rec, groups=np.arange(8) < 4)
    assert [r["n"] for r in sub] == [2, 1, 1, 0]


def test_noisy_solutions_move_only_the_listed_op_and_keep_the_chain():
    examples = toy.make_examples(3000, seed=4)
    ts = toy.TrainSettings(toy.STUDENT_SIZE, steps=1, seed=3, op_noise=(("*", 0.6),))
    noisy = toy.noisy_solutions(examples, ts)
    moved = total = 0
    for e, n in zip(examples, noisy):
        assert n["problem"] == e["problem"] and n["answer"] == e["answer"]
        # a moved value may take a later difference below zero ("3-4=-1.")
        steps = re.findall(r"(-?\d+)([-+*])(\d+)=(-?\d+)\.", n["solution"])
        assert len(steps) == len(re.findall(r"=", e["solution"]))
        prev = None
        for a, op, b, c in steps:
            a, b, c = int(a), int(b), int(c)
            assert prev is None or a == prev  # the chain continues from the written value
            true = a + b if op == "+" else a - b if op == "-" else a * b
            if op == "*":
                total += 1
                moved += c != true
                assert abs(c - true) <= 1 and (c >= 0 or true < 0)
            else:
                assert c == true
            prev = c
        assert n["solution"].endswith(f"\\boxed{{{prev}}}")
    assert abs(moved / total - 0.6) < 0.04
    assert toy.noisy_solutions(examples, ts) == noisy  # seeded
    assert toy.noisy_solutions(examples, toy.TrainSettings(toy.STUDENT_SIZE, steps=1)) == examples


# ------------------------------------------------------------------------------ the long toy

_CLAUSE = re.compile(r"([a-z]) (?:(\d+)([-+*])(\d+)=(\d+)|(\d+))\.")


def _run_program(problem):
    """Independent interpreter of a long-toy problem: [(label, op, operand)], the value after
    each instruction, and the index of the last reset."""
    m = re.fullmatch(r"Run ((?:[a-z](?:=\d+|[-+*]\d+) ?)+)\.", problem)
    assert m, problem
    instr = [(x[0], x[1], int(x[2:])) for x in m.group(1).split(" ")]
    values, x = [], None
    for _, op, v in instr:
        x = v if op == "=" else x + v if op == "+" else x - v if op == "-" else x * v
        values.append(x)
    last_reset = max(i for i, (_, op, _) in enumerate(instr) if op == "=")
    return instr, values, last_reset


def test_long_worked_solutions_are_correct():
    d = toy.LongDifficulty()
    examples = toy.make_examples(300, seed=5, difficulty=d)
    assert examples == toy.make_examples(300, seed=5, difficulty=d)  # deterministic
    resets_in_last_fifth = 0
    for e in examples:
        instr, values, last_reset = _run_program(e["problem"])
        assert d.min_steps <= len(instr) <= d.max_steps
        assert [lab for lab, _, _ in instr] == list(toy.LABELS[:len(instr)])
        assert instr[0][1] == "=" and int(e["answer"]) == values[-1]
        assert all(0 <= v <= d.max_value for v in values)
        *clauses, boxed = e["solution"].split(" \\boxed")
        assert boxed == f"{{{e['answer']}}}"
        parts = _CLAUSE.findall(clauses[0])
        assert " ".join(p for p in re.split(r"(?<=\.) ", clauses[0])) == clauses[0]
        assert len(parts) == len(instr), e
        prev = None
        for (lab, a, op, b, c, reset), (lab_p, op_p, v), value in zip(parts, instr, values):
            assert lab == lab_p
            if op_p == "=":
                assert reset and int(reset) == v == value
            else:
                assert (int(a), op, int(b), int(c)) == (prev, op_p, v, value), e
                assert not (op == "*" and v == 1) and 1 <= v <= d.max_operand
            prev = value
        assert toy.long_live_steps(e["problem"]) == len(instr) - 1 - last_reset
        resets_in_last_fifth += any(op == "=" for _, op, _ in instr[int(0.8 * len(instr)):])
    # Recovery from 80% of a response needs a reset after the cut in a fair share of problems
    # (0.15 per instruction: 1 - 0.85^4..5, ~50%).
    assert 0.3 < resets_in_last_fifth / len(examples) < 0.7


def test_long_difficulty_validation_and_family():
    with pytest.raises(ValueError, match="min_steps"):
        toy.LongDifficulty(min_steps=20, max_steps=10)
    with pytest.raises(ValueError, match="min_steps"):
        toy.LongDifficulty(max_steps=27)
    with pytest.raises(ValueError, match="reset_prob"):
        toy.LongDifficulty(reset_prob=1.0)
    s1 = toy.toy_settings("long", 1)
    assert isinstance(s1.difficulty, toy.LongDifficulty) and s1.seed == 1
    assert (s1.teacher.seed, s1.student.seed) == (1001, 1002)
    # The model positions cover the longest SFT sequence plus sampling room; builds of the
    # short toys keep the 256 they always had.
    assert toy._max_positions(80) == 256 and toy._max_positions(350) == 512


def test_long_toy_solution_lengths_in_tokens():
    # The range: worked solutions of 150-400 tokens, with a tokenizer trained on the
    # long toy's own corpus as build_toy trains it.
    def lengths(difficulty):
        train, test = toy.split_examples(2000, 200, seed=0, difficulty=difficulty)
        tokenizer = toy.train_tokenizer(toy.tokenizer_corpus(train))
        return [len(tokenizer(e["solution"], add_special_tokens=False)["input_ids"]) for e in test]

    # Measured 2026-12-04: 127-236 tokens, mean ~180 (16-24 clauses of 8-10 tokens).
    n = lengths(toy.LongDifficulty())
    assert 120 <= min(n) and np.mean(n) >= 150 and max(n) <= 400, (min(n), np.mean(n), max(n))
    # The family's own difficulty (iteration 3: values up to 19, fewer two-digit numbers;
    # measured 2026-12-05: 121-218 tokens, mean 170).
    n = lengths(toy.FAMILIES["long"].difficulty)
    assert 110 <= min(n) and np.mean(n) >= 150 and max(n) <= 400, (min(n), np.mean(n), max(n))


def test_premise_ess_and_spread_against_the_papers_worked_example():
    from scope_jax.losses import scope_weights
    from tools import premise

    # Paper (tau = 1): three wrong rollouts with teacher PPL 1.361, 1.755, 2.383 get
    # w^tea = (0.426, 0.330, 0.243). Build log-probs with those mean log-probs (ragged lengths),
    # plus a lone wrong rollout in a second group (no ESS for a path of one) and correct rows.
    ppl = np.array([1.361, 1.755, 2.383, 1.5, 1.2, 1.5, 2.0])
    lengths = np.array([3, 5, 4, 2, 3, 4, 5])
    t = 6
    mask = np.arange(t)[None, :] < lengths[:, None]
    lp = np.where(mask, -np.log(ppl)[:, None], 0.0).astype(np.float32)
    groups = np.array([0, 0, 0, 1, 1, 1, 1])
    correct = np.array([False, False, False, False, True, True, True])
    w_stu, w_tea = (np.asarray(w) for w in scope_weights(lp, lp, mask, correct, groups))
    np.testing.assert_allclose(w_tea[:3], [0.426, 0.330, 0.243], atol=1.5e-3)
    np.testing.assert_allclose(w_stu[4:], [0.255, 0.319, 0.426], atol=1.5e-3)  # paper's too
    ess, n = premise.group_ess(w_tea, groups, ~correct)
    assert n.tolist() == [3]  # group 1 has one wrong rollout: no ESS
    assert ess[0] == pytest.approx(1 / (0.426 ** 2 + 0.330 ** 2 + 0.243 ** 2), rel=1e-2)
    ess_c, n_c = premise.group_ess(w_stu, groups, correct)
    assert n_c.tolist() == [3] and ess_c[0] == pytest.approx(
        1 / (0.255 ** 2 + 0.319 ** 2 + 0.426 ** 2), rel=1e-2)
    # Uniform weights have ESS n; all weight on one rollout has ESS 1 (unnormalised input).
    g = np.zeros(4, int)
    assert premise.group_ess(np.full(4, 0.7), g, np.ones(4, bool))[0][0] == pytest.approx(4.0)
    assert premise.group_ess(np.array([0.0, 2.0, 0.0, 0.0]), g, np.ones(4, bool))[0][0] == 1.0
    spread = premise.group_spread(np.log(ppl), groups, ~correct)
    assert spread.tolist() == pytest.approx([np.log(ppl[:3]).std()])
    s = premise.weight_summary(np.log(ppl), w_tea, groups, ~correct)
    assert s["groups"] == 1 and s["ess_over_n"] == pytest.approx(ess[0] / 3)
    assert premise.weight_summary(np.log(ppl), w_tea, groups, np.zeros(7, bool))["ess"] is None


def test_study_long_toy_option_configs_and_costs(tmp_path):
    from tools import study

    plan = study.Plan(toys=("toy", "long"), seeds=(0,), methods=("student", "opd", "scope"),
                      steps=10, problems=200, k=16)
    paths = toy.toy_paths(tmp_path / "b")
    cfg = study.make_config(plan, str(tmp_path), "long", 0, "scope", paths)
    assert cfg.toy_family == "long" and cfg.sampling.max_new_tokens == 320
    assert cfg.data.max_prompt_len == 128 and cfg.num_samples == 8 and cfg.seed == 0
    cfg = study.make_config(plan, str(tmp_path), "long_styles", 0, "opd", paths)
    assert cfg.toy_family == "long_styles" and cfg.num_samples == 1
    assert study.make_config(plan, str(tmp_path), "toy", 0, "scope", paths).sampling.max_new_tokens == 48
    # The budget charges the long toy its own costs, the short toy the given ones.
    costs = {"build": 100.0, "eval": 10.0, "overhead": 5.0, "step": {"opd": 0.5, "scope": 1.0}}
    b = study.budget(plan, str(tmp_path / "none"), costs)
    lc = study.LONG_COSTS
    want_train = (10 * 0.5 + 5 + 10 * 1.0 + 5) + (10 * lc["step"]["opd"] + lc["overhead"]
                                                   + 10 * lc["step"]["scope"] + lc["overhead"])
    assert b["seconds"]["training"] == pytest.approx(want_train)
    assert b["seconds"]["builds"] == pytest.approx(100.0 + lc["build"])
    assert b["seconds"]["evaluation"] == pytest.approx(3 * 10.0 + 3 * lc["eval"])
    assert "long uses its own costs" in study.format_budget(b)
    # A study's own measurements of the long toy replace LONG_COSTS for it, and stay out of
    # the short toys' costs.
    run = tmp_path / "s" / "runs" / "long" / "s0" / "scope"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "time_s": t}) + "\n" for i, t in enumerate((50, 3, 5))))
    assert study.measured_costs(str(tmp_path / "s"), "long")["step"]["scope"] == 4.0
    assert study.measured_costs(str(tmp_path / "s"))["step"]["scope"] == study.COSTS["step"]["scope"]


def test_second_style_keeps_the_arithmetic_and_the_token_count():
    examples = toy.make_examples(50, seed=9, difficulty=toy.LongDifficulty())
    tokenizer = toy.train_tokenizer(toy.tokenizer_corpus(examples))
    for e in examples:
        b = toy.to_second_style(e["solution"])
        # Undo the punctuation by hand: the same clauses, values and boxed answer.
        back = re.sub(r"([a-z]):", r"\1 ", b).replace(">", "=").replace(";", ".")
        assert back == e["solution"] and b.endswith(f"\\boxed{{{e['answer']}}}")
        assert not re.search(r"[a-z] \d", b) and "=" not in b  # every clause restyled
        n = lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])
        assert abs(n(b) - n(e["solution"])) <= len(b) // 10
    ts = toy.TrainSettings(toy.STUDENT_SIZE, steps=1, seed=4, second_style=0.5)
    out = toy.second_style_solutions(examples, ts)
    assert out == toy.second_style_solutions(examples, ts)  # seeded
    styled = [o["solution"] != e["solution"] for o, e in zip(out, examples)]
    assert 10 < sum(styled) < 40 and all(o["problem"] == e["problem"] for o, e in zip(out, examples))
    assert toy.second_style_solutions(examples, dataclasses.replace(ts, second_style=0.0)) == examples
    with pytest.raises(ValueError, match="second_style"):
        toy.TrainSettings(toy.STUDENT_SIZE, steps=1, second_style=1.5)
    # The teachers of "long" and "long_styles" have identical settings (the same model).
    assert toy.FAMILIES["long"].teacher == toy.FAMILIES["long_styles"].teacher
    d = toy._settings_dict(toy.FAMILIES["long_styles"])
    assert d["student"]["second_style"] == 0.5 and "second_style" not in d["teacher"]


def test_build_toy_copies_the_teacher_of_a_build_that_differs_only_in_the_student(built, tmp_path):
    src = os.path.dirname(built["manifest"])
    restyled = dataclasses.replace(_TINY, student=dataclasses.replace(_TINY.student, steps=3))
    paths = toy.build_toy(tmp_path / "b", settings=restyled, verbose=False, teacher_from=src)
    for name in os.listdir(built["teacher"]):
        with open(os.path.join(built["teacher"], name), "rb") as f, \
                open(os.path.join(paths["teacher"], name), "rb") as g:
            assert f.read() == g.read(), name
    with open(paths["manifest"]) as f:
        manifest = json.load(f)
    assert manifest["models"]["teacher"]["copied_from"] == src
    assert manifest["settings"]["student"]["steps"] == 3
    # A build whose teacher would differ is refused.
    other = dataclasses.replace(restyled, teacher=dataclasses.replace(_TINY.teacher, steps=5))
    with pytest.raises(ValueError, match="more than the student"):
        toy.build_toy(tmp_path / "c", settings=other, verbose=False, teacher_from=src)
