"""Tests for scope_jax.data: loaders of every shipped dataset, malformed rows, TFDS without
TensorFlow, chat-template prompts, deterministic sharded batching and padding.

References are independent of the code under test: raw JSON / pyarrow reads, regexes over the
source text, hand-written expected strings, and the `tokenizers` library directly.
"""
import json
import logging
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scope_jax import benchmarks
from scope_jax import data as D

DATA = benchmarks.DIR  # shipped in the package: scope_jax/benchmarks/SOURCES.md

ROW_COUNTS = {
    "aime24.jsonl": 30, "aime25.jsonl": 30, "amc23.jsonl": 40, "gsm8k_test.jsonl": 1319,
    "math500.jsonl": 500, "minerva_math.jsonl": 272, "olympiadbench.jsonl": 675,
    "scope_train_sample.parquet": 2000,
}


def _raw_rows(name):
    path = os.path.join(DATA, name)
    if name.endswith(".parquet"):
        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _git_blob_id(path):
    """git's object id of a file (sha1 of "blob <size>\\0" + bytes), independent of git itself."""
    import hashlib

    with open(path, "rb") as f:
        content = f.read()
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def test_shipped_files_are_the_recorded_source_files():
    """Every shipped data file has a SOURCES.md row whose git blob id (the id of the source
    repository's file at the recorded commit) matches its bytes, and a shipped licence text."""
    with open(os.path.join(DATA, "SOURCES.md"), encoding="utf-8") as f:
        rows = [[c.strip() for c in line.strip().strip("|").split("|")]
                for line in f if line.startswith("| ") and not line.startswith("| file")]
    recorded = {r[0]: r[-1] for r in rows}
    assert set(recorded) == set(ROW_COUNTS) == {f for f in os.listdir(DATA)
                                                 if f.endswith((".jsonl", ".parquet"))}
    for name, blob in recorded.items():
        assert _git_blob_id(os.path.join(DATA, name)) == blob, name
    assert {r[0]: int(r[1]) for r in rows} == ROW_COUNTS
    for licence in ("LICENSE-MIT.txt", "LICENSE-Apache-2.0.txt"):
        assert os.path.getsize(os.path.join(DATA, licence)) > 1000
    assert benchmarks.path("gsm8k").endswith("gsm8k_test.jsonl")
    assert benchmarks.path("deepmath").endswith("scope_train_sample.parquet")
    with pytest.raises(FileNotFoundError, match="math500"):
        benchmarks.path("no_such_benchmark")


# ---------------------------------------------------------------------------------------------
# Shipped datasets


@pytest.mark.parametrize("name", sorted(ROW_COUNTS))
def test_every_file_loads_with_its_row_count(name):
    examples = D.load_examples(os.path.join(DATA, name))
    assert len(examples) == ROW_COUNTS[name] == len(_raw_rows(name))
    assert examples.skipped == []
    for e in examples:
        assert isinstance(e.problem, str) and e.problem.strip()
        golds = e.answer if isinstance(e.answer, list) else [e.answer]
        assert golds and all(isinstance(g, str) and g.strip() for g in golds)
    # Sources point back at the row: 1-based JSONL lines, 0-based parquet rows.
    assert examples[0].source.endswith(":1") or examples[0].source.endswith("[0]")
    assert examples[-1].source.endswith(f":{ROW_COUNTS[name]}") or \
        examples[-1].source.endswith(f"[{ROW_COUNTS[name] - 1}]")


@pytest.mark.parametrize("name,problem_key", [("aime24.jsonl", "problem"),
                                              ("aime25.jsonl", "problem"),
                                              ("math500.jsonl", "problem")])
def test_plain_answers_match_the_raw_field(name, problem_key):
    raw = _raw_rows(name)
    examples = D.load_examples(os.path.join(DATA, name))
    assert [e.answer for e in examples] == [r["answer"].strip() for r in raw]
    assert [e.problem for e in examples] == [r[problem_key] for r in raw]


def test_amc23_float_answers_become_integers():
    raw = _raw_rows("amc23.jsonl")
    examples = D.load_examples(os.path.join(DATA, "amc23.jsonl"))
    assert examples[0].answer == "27"
    assert all(float(r["answer"]).is_integer() for r in raw)
    assert [e.answer for e in examples] == ["%d" % r["answer"] for r in raw]
    assert "-1" in [e.answer for e in examples]


def test_gsm8k_gold_is_after_hashes():
    raw = _raw_rows("gsm8k_test.jsonl")
    examples = D.load_examples(os.path.join(DATA, "gsm8k_test.jsonl"))
    assert examples[0].answer == "18"
    assert examples[0].problem.startswith("Janet\u2019s ducks lay 16 eggs")
    ref = [re.search(r"####\s*([-0-9,]+)\s*$", r["answer"]).group(1).replace(",", "") for r in raw]
    assert [e.answer for e in examples] == ref
    assert all(re.fullmatch(r"-?\d+", e.answer) for e in examples)


def test_minerva_gold_is_the_last_boxed_content():
    raw = _raw_rows("minerva_math.jsonl")
    examples = D.load_examples(os.path.join(DATA, "minerva_math.jsonl"))
    # Read by eye from the solutions' tails.
    assert [e.answer for e in examples[:5]] == ["1.6", "4.5e33", "41.8", "20.39", "0.006"]
    # Nested braces (line 31): \boxed{\sqrt{4 \pi G \rho_{0} r_{0}^{2}}}=\text { constant }
    assert examples[30].answer == "\\sqrt{4 \\pi G \\rho_{0} r_{0}^{2}}"
    for r, e in zip(raw, examples):
        tail = r["solution"][r["solution"].rindex("\\boxed{") + len("\\boxed{"):]
        rest = tail.lstrip()
        assert rest.startswith(e.answer) and rest[len(e.answer):].lstrip().startswith("}")
        assert e.answer.count("{") == e.answer.count("}")


def test_olympiadbench_answers_are_lists():
    raw = _raw_rows("olympiadbench.jsonl")
    examples = D.load_examples(os.path.join(DATA, "olympiadbench.jsonl"))
    assert all(isinstance(e.answer, list) for e in examples)
    assert [e.answer for e in examples] == [[a.strip() for a in r["final_answer"]] for r in raw]
    assert [e.problem for e in examples] == [r["question"] for r in raw]
    multi = [e for e in examples if e.meta["is_multiple_answer"]]
    assert len(multi) == 94
    assert multi[1].answer == ["$69$,$84$"]
    assert examples[0].meta == {"id": 1606, "answer_type": "Numerical", "unit": None,
                                "is_multiple_answer": False}


def test_deepmath_parquet_keeps_its_prompt_messages():
    raw = _raw_rows("scope_train_sample.parquet")
    examples = D.load_examples(os.path.join(DATA, "scope_train_sample.parquet"))
    assert [e.answer for e in examples] == [r["reward_model"]["ground_truth"].strip() for r in raw]
    assert examples[0].answer == "n"
    for r, e in zip(raw, examples):
        assert e.messages == r["prompt"]
        content = r["prompt"][-1]["content"]
        assert content.startswith(e.problem)
        assert content[len(e.problem):].strip() == "Put your final answer within \\boxed{{}}."
        assert e.meta["extra_info.index"] == r["extra_info"]["index"]
    assert examples[0].source.endswith("scope_train_sample.parquet[0]")


# ---------------------------------------------------------------------------------------------
# Malformed rows


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


BAD_ROWS = [  # (line content, field named in the error or None)
    ('{"problem": "1+1?", "answer": "2"}', "ok"),
    ('{"problem": "1+2?", "answer": ', None),  # truncated JSON
    ('{"answer": "4"}', "problem"),
    ('{"problem": "   ", "answer": "4"}', "problem"),
    ('{"problem": "2+2?", "answer": {"x": 1}}', "answer"),
    ('{"problem": "2+3?", "answer": ""}', "answer"),
    ('{"problem": "2+4?", "answer": null}', "answer"),
    ('{"problem": 7, "answer": "6"}', "problem"),
    ('[1, 2]', None),
    ('{"problem": "3+3?", "answer": 6.0}', "ok"),
    ('{"problem": "3+4?", "answer": true}', "answer"),
]


def test_malformed_rows_raise_with_file_line_and_field(tmp_path):
    spec = D.FieldSpec("problem", "answer")
    for k, (line, field) in enumerate(BAD_ROWS):
        if field == "ok":
            continue
        path = _write_lines(tmp_path / f"bad{k}.jsonl", [BAD_ROWS[0][0], "", line])
        with pytest.raises(D.DataError) as info:
            D.load_examples(path, spec)
        err = info.value
        assert (err.file, err.line, err.field) == (path, 3, field)
        assert f"{path}, line 3" in str(err)
        if field:
            assert repr(field) in str(err)


def test_skip_mode_counts_and_logs(tmp_path, caplog):
    path = _write_lines(tmp_path / "mixed.jsonl", [line for line, _ in BAD_ROWS])
    with caplog.at_level(logging.WARNING, logger="scope_jax.data"):
        examples = D.load_examples(path, D.FieldSpec("problem", "answer"), on_error="skip")
    assert [e.answer for e in examples] == ["2", "6"]
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:10"]
    expected = [(k + 1, f) for k, (_, f) in enumerate(BAD_ROWS) if f != "ok"]
    assert [(e.line, e.field) for e in examples.skipped] == expected
    assert f"skipped {len(expected)} malformed row(s) of {len(BAD_ROWS)}" in caplog.text


def test_answer_kinds_on_malformed_solutions(tmp_path):
    rows = [
        {"problem": "p", "solution": "so \\boxed{\\frac{1}{2}} then \\boxed{x^{2}}."},
        {"problem": "p", "solution": "no box here"},
        {"problem": "p", "solution": "open \\boxed{\\frac{1}{2}"},
        {"problem": "p", "solution": "empty \\boxed{ }"},
    ]
    path = _write_lines(tmp_path / "sol.jsonl", [json.dumps(r) for r in rows])
    spec = D.FieldSpec("problem", "solution", "boxed_in_solution")
    got = D.load_examples(path, spec, on_error="skip")
    assert [e.answer for e in got] == ["x^{2}"]
    assert [(e.line, e.field) for e in got.skipped] == [(2, "solution"), (3, "solution"),
                                                       (4, "solution")]
    rows = [{"q": "p", "a": "work\n#### 1,234"}, {"q": "p", "a": "work, no marker 12"},
            {"q": "p", "a": "#### "}]
    path = _write_lines(tmp_path / "hash.jsonl", [json.dumps(r) for r in rows])
    got = D.load_examples(path, D.FieldSpec("q", "a", "gsm8k_hash"), on_error="skip")
    assert [e.answer for e in got] == ["1234"]
    assert [e.line for e in got.skipped] == [2, 3]
    rows = [{"q": "p", "a": ["1", "2"]}, {"q": "p", "a": []}, {"q": "p", "a": ["1", ""]},
            {"q": "p", "a": "1"}]
    path = _write_lines(tmp_path / "list.jsonl", [json.dumps(r) for r in rows])
    got = D.load_examples(path, D.FieldSpec("q", "a", "list"), on_error="skip")
    assert [e.answer for e in got] == [["1", "2"]]
    assert [(e.line, e.field) for e in got.skipped] == [(2, "a"), (3, "a[1]"), (4, "a")]


def test_malformed_parquet_rows_name_the_row(tmp_path):
    good = [{"role": "user", "content": "What is 1+1?"}]
    table = pa.table({
        "prompt": [good, good, [], [{"role": "system", "content": "be brief"}]],
        "reward_model": [{"ground_truth": "2", "style": "rule"}, {"ground_truth": None,
                         "style": "rule"}, {"ground_truth": "3", "style": "rule"},
                         {"ground_truth": "4", "style": "rule"}],
    })
    path = str(tmp_path / "deepmath.parquet")
    pq.write_table(table, path)
    with pytest.raises(D.DataError) as info:
        D.load_examples(path)  # spec inferred from "deepmath" in the name
    assert (info.value.file, info.value.line, info.value.field) == (
        path, 1, "reward_model.ground_truth")
    assert "row 1" in str(info.value)
    got = D.load_examples(path, "deepmath", on_error="skip")
    assert [e.problem for e in got] == ["What is 1+1?"]
    assert [(e.line, e.field) for e in got.skipped] == [
        (1, "reward_model.ground_truth"), (2, "prompt"), (3, "prompt")]


def test_unknown_files_and_names(tmp_path):
    path = _write_lines(tmp_path / "mystery.jsonl", ['{"problem": "p", "answer": "a"}'])
    with pytest.raises(D.DataError, match="cannot infer the field mapping"):
        D.load_examples(path)
    assert D.load_examples(path, D.FieldSpec("problem", "answer"))[0].answer == "a"
    with pytest.raises(D.DataError, match="no such file"):
        D.load_examples(tmp_path / "absent.jsonl", "math500")
    with pytest.raises(D.DataError, match="unsupported file type"):
        D.load_examples(_write_lines(tmp_path / "x.csv", ["a,b"]), "math500")
    with pytest.raises(D.DataError, match="holds no rows"):
        D.load_examples(_write_lines(tmp_path / "aime24.jsonl", ["", "  "]))
    err = pickle.loads(pickle.dumps(D.DataError("bad", file="f.jsonl", line=3, field="answer")))
    assert (str(err), err.file, err.line, err.field) == (
        "f.jsonl, line 3, field 'answer': bad", "f.jsonl", 3, "answer")
    with pytest.raises(ValueError, match="answer_kind"):
        D.FieldSpec("problem", "answer", "boxed")


# ---------------------------------------------------------------------------------------------
# TFDS


TFDS_SCRIPT = r"""
import json, sys
from scope_jax import benchmarks
from scope_jax import data as D
jsonl, data_dir = sys.argv[1], sys.argv[2]
builder = D.jsonl_tfds_builder(jsonl, data_dir, split="test")
got = D.load_tfds(builder, "test")
ref = D.load_examples(jsonl)
assert [(e.problem, e.answer, e.meta) for e in got] == [(e.problem, e.answer, e.meta) for e in ref]
files = sorted(p.name for p in builder.data_path.iterdir())
again = D.load_tfds(D.jsonl_tfds_builder(jsonl, data_dir, split="test"), "test", spec="math500")
assert [e.answer for e in again] == [e.answer for e in ref]
print(json.dumps({"n": len(got), "files": files, "tf": "tensorflow" in sys.modules,
                  "source": got[0].source}))
"""


def test_tfds_array_record_round_trip_without_tensorflow(tmp_path):
    jsonl = tmp_path / "math500.jsonl"
    with open(os.path.join(DATA, "math500.jsonl"), encoding="utf-8") as f:
        jsonl.write_text("".join(f.readlines()[:25]), encoding="utf-8")
    # A fresh interpreter, so that "no TensorFlow imported" is about this code path alone.
    out = subprocess.run([sys.executable, "-c", TFDS_SCRIPT, str(jsonl), str(tmp_path / "tfds")],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n"] == 25
    assert result["tf"] is False
    assert any(".array_record-" in name for name in result["files"])
    assert "/test[0]" in result["source"]


def test_tfds_malformed_row_names_the_jsonl_line(tmp_path):
    path = tmp_path / "aime25.jsonl"
    path.write_bytes(b'{"problem": "p", "answer": "1"}\n{"problem": "q"}\n{oops\n'
                     b'{"problem": "\xff", "answer": "2"}\n')
    builder = D.jsonl_tfds_builder(path, tmp_path / "tfds")
    with pytest.raises(D.DataError) as info:
        D.load_tfds(builder, "train")  # spec inferred from the stem: aime25
    assert (info.value.line, info.value.field) == (2, "answer")
    assert "(JSONL), line 2, field 'answer'" in str(info.value)
    got = D.load_tfds(builder, "train", on_error="skip")
    assert [e.answer for e in got] == ["1"]
    assert [(e.line, e.field) for e in got.skipped] == [(2, "answer"), (3, None), (4, None)]
    assert "UTF-8" in str(got.skipped[-1])
    # The same rows through the plain JSONL reader give the same errors.
    plain = D.load_examples(path, on_error="skip")
    assert [(e.line, e.field) for e in plain.skipped] == [(2, "answer"), (3, None), (4, None)]


def test_tfds_source_from_a_config_for_training_and_evaluation(tmp_path, tokenizer):
    """data.spec = "tfds:NAME[:split]" with data.train_files = the TFDS data_dir: the trainer's
    prompts (train._load_prompts) and tools/eval's --data tfds:... read the same examples as
    the JSONL the local builder was made from."""
    from configs import toy
    from scope_jax import train
    from tools import eval as eval_tool

    jsonl = tmp_path / "math500.jsonl"
    with open(os.path.join(DATA, "math500.jsonl"), encoding="utf-8") as f:
        jsonl.write_text("".join(f.readlines()[:12]), encoding="utf-8")
    data_dir = tmp_path / "tfds"
    name = D.jsonl_tfds_builder(jsonl, data_dir, split="test").info.full_name.rsplit("/", 1)[0]
    assert name.startswith(D.JSONL_TFDS_NAME + "/math500-")
    ref = D.load_examples(jsonl)
    got = D.load_examples(data_dir, f"tfds:{name}:test")
    assert [(e.problem, e.answer) for e in got] == [(e.problem, e.answer) for e in ref]
    assert got[0].source.startswith(f"tfds:{name}/1.0.0/test")
    with pytest.raises(D.DataError, match="split"):  # no "train" split in this copy
        D.load_examples(data_dir, f"tfds:{name}")
    with pytest.raises(D.DataError, match="data_dir"):
        D.load_examples(jsonl, f"tfds:{name}:test")
    assert D.tfds_source("tfds:huggingface:openai/gsm8k") == ("huggingface:openai/gsm8k", "train")
    assert D.tfds_source("tfds:mnist:test") == ("mnist", "test")
    # Training: the config's prompts.
    fast, _ = tokenizer
    cfg = toy.get_config()
    cfg.data.train_files, cfg.data.spec, cfg.prompts_per_step = str(data_dir), f"tfds:{name}:test", 4
    cfg.data.max_prompt_len = 4096  # math500 problems, not the toy's short ones
    loader = train._load_prompts(cfg, fast)
    ids, kept = D.encode_prompts(ref, fast, max_prompt_len=cfg.data.max_prompt_len,
                                 instruction=cfg.data.instruction or None, style=cfg.data.style)
    assert loader.items == [(t, ref[i].answer) for t, i in zip(ids, kept)]
    # Evaluation: tools/eval's --data.
    label, source = eval_tool.resolve_data(f"tfds:{name}:test", str(data_dir))
    assert label == "math500" and source == f"tfds:{name}:test"


def test_tfds_registered_builders_need_data_or_network(tmp_path):
    with pytest.raises(D.DataError, match="not prepared .* download=True .* network"):
        D.load_tfds("mnist", "test", data_dir=tmp_path, spec="gsm8k")
    with pytest.raises(D.DataError, match="cannot make TFDS builder 'no_such_dataset_xyz'"):
        D.load_tfds("no_such_dataset_xyz", "test", data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# Prompts

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["Please reason step by step, and put your final answer within \\boxed{}.",
              "What is the sum of 17 and 25? Find the area of the triangle.",
              "Let x be a real number such that x^2 = 4. Compute x + 1."] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast, tok


def test_build_prompt_chat_raw_and_deepmath(tokenizer):
    fast, _ = tokenizer
    instruction = "Please reason step by step, and put your final answer within \\boxed{}."
    assert D.PAPER_INSTRUCTION == instruction
    assert D.build_prompt("What is 2+2?", fast) == (
        f"<s><|user|>What is 2+2?\n{instruction}<|end|><|assistant|>")
    ex = D.Example("What is 2+2?", "4", "t:1")
    assert D.build_prompt(ex, fast, instruction=None) == (
        "<s><|user|>What is 2+2?<|end|><|assistant|>")
    assert D.build_prompt(ex, None, style="raw") == f"What is 2+2?\n{instruction}"
    dm = D.Example("Q", "4", "t:2", messages=[
        {"role": "user", "content": "QPut your final answer within \\boxed{{}}."}])
    assert D.build_prompt(dm, fast, style="deepmath") == (
        "<s><|user|>QPut your final answer within \\boxed{{}}.<|end|><|assistant|>")
    thinking = type(fast)(tokenizer_object=tokenizer[1], bos_token="<s>")
    thinking.chat_template = CHAT_TEMPLATE + "{% if enable_thinking is false %}<nothink>{% endif %}"
    assert D.build_prompt(ex, thinking, instruction=None).endswith("<|assistant|>")
    assert D.build_prompt(ex, thinking, instruction=None, chat_template_kwargs={
        "enable_thinking": False}).endswith("<|assistant|><nothink>")
    with pytest.raises(ValueError, match="carries its own prompt"):
        D.build_prompt(ex, fast, style="deepmath")
    fast_no_template = type(fast)(tokenizer_object=tokenizer[1])
    with pytest.raises(ValueError, match="chat_template"):
        D.build_prompt(ex, fast_no_template)


def test_deepmath_prompts_from_the_parquet(tokenizer):
    fast, _ = tokenizer
    raw = _raw_rows("scope_train_sample.parquet")[:3]
    examples = D.load_examples(os.path.join(DATA, "scope_train_sample.parquet"))[:3]
    for r, e in zip(raw, examples):
        assert D.build_prompt(e, fast, style="deepmath") == (
            f"<s><|user|>{r['prompt'][0]['content']}<|end|><|assistant|>")


def test_encode_prompts_drops_overlong(tokenizer, caplog):
    fast, raw_tok = tokenizer
    problems = ["What is 2+2?", "Find the area of the triangle. " * 30, "Compute x + 1."]
    texts = [f"<s><|user|>{p}\n{D.PAPER_INSTRUCTION}<|end|><|assistant|>" for p in problems]
    ref = [raw_tok.encode(t, add_special_tokens=False).ids for t in texts]
    limit = max(len(ref[0]), len(ref[2]))
    assert len(ref[1]) > limit
    with caplog.at_level(logging.WARNING, logger="scope_jax.data"):
        ids, kept = D.encode_prompts(problems, fast, max_prompt_len=limit)
    assert kept == [0, 2]
    assert ids == [ref[0], ref[2]]
    assert ids[0][0] == raw_tok.token_to_id("<s>") and ids[0].count(raw_tok.token_to_id("<s>")) == 1
    assert "dropped 1 of 3 prompts longer than max_prompt_len" in caplog.text
    ids, kept = D.encode_prompts(problems, fast, max_prompt_len=10_000)
    assert kept == [0, 1, 2] and ids[1] == ref[1]


# ---------------------------------------------------------------------------------------------
# Batching and padding


def test_loader_is_a_pure_function_of_seed_and_step():
    items = list(range(103))
    a = D.PromptLoader(items, batch_size=8, seed=3, shard_index=0, shard_count=1)
    b = D.PromptLoader(items, batch_size=8, seed=3, shard_index=0, shard_count=1)
    c = D.PromptLoader(items, batch_size=8, seed=4, shard_index=0, shard_count=1)
    assert a.steps_per_epoch == 12
    run = [a.batch_at(s) for s in range(40)]
    assert run == [b.batch_at(s) for s in range(40)]
    assert run != [c.batch_at(s) for s in range(40)]
    # A resumed run (fresh object, start at step 17) sees exactly the same batches.
    resumed = D.PromptLoader(items, batch_size=8, seed=3, shard_index=0, shard_count=1)
    assert [resumed.batch_at(s) for s in range(17, 40)] == run[17:]
    # The documented contract: numpy Generator([seed, epoch]) permutation, sliced per step.
    for step in (0, 11, 12, 30):
        epoch, k = divmod(step, 12)
        perm = np.random.default_rng([3, epoch]).permutation(103)
        assert a.batch_at(step) == perm[8 * k:8 * k + 8].tolist()
    # Within an epoch no item repeats; epochs differ in order.
    epoch0 = np.concatenate([a.indices_at(s) for s in range(12)])
    assert len(set(epoch0.tolist())) == 96
    assert a.batch_at(0) != a.batch_at(12)


def test_hosts_are_disjoint_and_cover_each_global_batch():
    items = [f"p{i}" for i in range(50)]
    hosts = [D.PromptLoader(items, batch_size=12, seed=0, shard_index=h, shard_count=4)
             for h in range(4)]
    assert all(h.local_batch_size == 3 for h in hosts)
    for step in range(10):
        parts = [h.indices_at(step) for h in hosts]
        assert all(p.shape == (3,) for p in parts)
        together = np.concatenate(parts)
        assert len(set(together.tolist())) == 12
        np.testing.assert_array_equal(together, hosts[0].global_indices_at(step))
        assert hosts[2].batch_at(step) == [items[i] for i in parts[2]]
    with pytest.raises(ValueError, match="multiple of shard_count"):
        D.PromptLoader(items, batch_size=10, seed=0, shard_index=0, shard_count=4)
    single = D.PromptLoader(items, batch_size=4, seed=0)  # jax: one process
    assert (single.shard_index, single.shard_count) == (0, 1)


def test_keep_remainder_gives_fixed_shapes_and_full_coverage():
    items = list(range(10))
    loader = D.PromptLoader(items, batch_size=4, seed=1, shard_index=0, shard_count=1,
                            drop_remainder=False)
    assert loader.steps_per_epoch == 3
    batches = [loader.batch_at(s) for s in range(3)]
    assert all(len(b) == 4 for b in batches)
    flat = sum(batches, [])
    assert sorted(set(flat)) == items and flat[10:] == flat[:2]
    tiny = D.PromptLoader([7, 8], batch_size=4, seed=0, shard_index=0, shard_count=1,
                          drop_remainder=False)
    assert sorted(tiny.batch_at(0)) == [7, 7, 8, 8]
    with pytest.raises(ValueError, match="cannot fill one batch"):
        D.PromptLoader([7, 8], batch_size=4, seed=0, shard_index=0, shard_count=1)


