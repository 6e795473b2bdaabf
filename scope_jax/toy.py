"""The toy task: multi-step integer arithmetic worked out step by step, with a verifiable answer.

    problem:  "Compute (7+5)*3-4."
    solution: "7+5=12. 12*3=36. 36-4=32. \\boxed{32}"
    answer:   "32"

The expression is evaluated left to right; parentheses are written only where the usual
precedence would otherwise change the order (a sum or difference that is then multiplied), so
the problem reads as ordinary arithmetic and its value is the value of the left-to-right chain.
Every intermediate value stays in [0, max_value], so each step is a small sum, difference or
product that a tiny transformer can learn digit by digit.

Also here: a tokenizer for the task (byte-level BPE trained locally with `tokenizers`, digits
always single tokens, a Qwen-style chat template), the teacher / student model sizes, and the
prompt convention shared by tools/make_toy.py and the trainer (TOY_INSTRUCTION, TOY_SPEC).
tools/make_toy.py builds the data, the tokenizer and the two checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from scope_jax import data
from scope_jax.data import FieldSpec, build_prompt
from scope_jax.losses import kd_loss, token_logprobs
from scope_jax.models import ModelConfig, Transformer, load_hf, save_hf
from scope_jax import rollout
from scope_jax.verifiers import InlineVerifier

# JSONL rows written by data.write_jsonl carry "problem", "answer" and "solution"; the trainer and the
# evaluator read them with scope_jax.data.load_examples(path, spec=TOY_SPEC), which keeps the
# worked solution in Example.meta["solution"].
TOY_SPEC = FieldSpec(problem="problem", answer="answer", meta=("solution",))

# The prompt is the problem itself ("Compute ...."): the paper's long instruction ("Please reason
# step by step, and put your final answer within \boxed{}.") would triple the prompt length of
# this toy without telling the model anything the training data does not. Pass
# instruction=TOY_INSTRUCTION to scope_jax.data.build_prompt / encode_prompts.
TOY_INSTRUCTION: str | None = None

OPS = "+-*"


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """Knobs of the problem generator.

    min_ops, max_ops: number of operations per problem (inclusive range).
    max_operand: operands are drawn from [1, max_operand] (the first number too).
    max_value: every intermediate value (and the answer) lies in [0, max_value].
    max_factor: both factors of a product are at most this (9: products of single digits, a
      table a small model learns quickly; larger values ask for multi-digit multiplication).
    ops: which operations may appear, a subset of "+-*".
    """

    min_ops: int = 2
    max_ops: int = 3
    max_operand: int = 9
    max_value: int = 99
    max_factor: int = 9
    ops: str = OPS

    def __post_init__(self):
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"Difficulty: need 1 <= min_ops <= max_ops, got {self.min_ops}, "
                             f"{self.max_ops}")
        if self.max_operand < 2:
            raise ValueError(f"Difficulty: max_operand must be >= 2, got {self.max_operand}")
        if self.max_factor < 2 and "*" in self.ops:
            raise ValueError(f"Difficulty: max_factor must be >= 2 with '*', got {self.max_factor}")
        if self.max_value < self.max_operand:
            raise ValueError(f"Difficulty: max_value {self.max_value} < max_operand "
                             f"{self.max_operand}")
        if not self.ops or not set(self.ops) <= set(OPS) or len(set(self.ops)) != len(self.ops):
            raise ValueError(f"Difficulty: ops must be distinct characters of {OPS!r}, "
                             f"got {self.ops!r}")


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def make_example(rng: random.Random, difficulty: Difficulty = Difficulty()) -> dict[str, str]:
    """One problem drawn with `rng` (a random.Random; advanced in place).

    Returns {"problem", "answer", "solution"} (all str); see the module docstring for the format.
    """
    if isinstance(difficulty, LongDifficulty):  # the long toy (FAMILIES["long"]) has its own task
        return make_long_example(rng, difficulty)
    d = difficulty
    num_ops = rng.randint(d.min_ops, d.max_ops)
    while True:  # rejection: restart when no operation keeps the value in range
        value = rng.randint(1, d.max_operand)
        expr, expr_prec = str(value), 3  # precedence of expr's top operator (3: a number)
        steps = []
        for _ in range(num_ops):
            for _attempt in range(20):
                op, b = rng.choice(d.ops), rng.randint(1, d.max_operand)
                if op == "*" and (b == 1 or b > d.max_factor or value > d.max_factor):
                    continue  # x*1 teaches nothing; large factors are excluded by the knob
                new = _apply(value, op, b)
                if 0 <= new <= d.max_value:
                    break
            else:
                break
            prec = 2 if op == "*" else 1
            # Left-to-right order: a lower-precedence left operand of "*" needs parentheses.
            left = f"({expr})" if expr_prec < prec else expr
            expr, expr_prec = f"{left}{op}{b}", prec
            steps.append(f"{value}{op}{b}={new}.")
            value = new
        if len(steps) == num_ops:
            break
    return {"problem": f"Compute {expr}.", "answer": str(value),
            "solution": " ".join(steps) + f" \\boxed{{{value}}}"}


def make_examples(n: int, seed: int, difficulty: Difficulty = Difficulty()) -> list[dict[str, str]]:
    """n problems, a pure function of (n, seed, difficulty): list of {"problem", "answer",
    "solution"} dicts (str values). The first k of make_examples(n, s) equal make_examples(k, s)."""
    if n < 0:
        raise ValueError(f"make_examples: n must be >= 0, got {n}")
    rng = random.Random(f"scope_jax.toy:{seed}")  # str seeds hash deterministically (sha512)
    return [make_example(rng, difficulty) for _ in range(n)]


def split_examples(n_train: int, n_test: int, seed: int, difficulty: Difficulty = Difficulty()
                   ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Disjoint train / test sets: the test problems are drawn first (seed), then train problems
    whose problem text is not in the test set (so test accuracy is not memorisation).
    Returns (train, test)."""
    test = make_examples(n_test, seed, difficulty)
    held_out = {e["problem"] for e in test}
    rng = random.Random(f"scope_jax.toy:{seed}:train")
    train = []
    while len(train) < n_train:
        e = make_example(rng, difficulty)
        if e["problem"] not in held_out:
            train.append(e)
    return train, test


# ---------------------------------------------------------------------------------------------
# Tokenizer

PAD, ENDOFTEXT, IM_START, IM_END = "<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, ENDOFTEXT, IM_START, IM_END)  # ids 0..3 in this order

# Qwen's ChatML layout, without the system-prompt and tool branches.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def train_tokenizer(texts: Sequence[str], vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on `texts` with `tokenizers`, wrapped for transformers.

    Digits are always split into single tokens (pre-tokenizer Digits(individual_digits=True)),
    so numbers are spelled digit by digit and the arithmetic stays learnable; merges only join
    letters, spaces and punctuation ("Compute", "assistant", "boxed", " (" ...), which keeps
    sequences short. The 256 byte symbols are all in the vocabulary, so every string round-trips.
    Special tokens: <pad> (0, padding), <|endoftext|> (1), <|im_start|> (2), <|im_end|> (3, EOS).
    No BOS token (as Qwen). Returns a transformers PreTrainedTokenizerFast with CHAT_TEMPLATE;
    save it with .save_pretrained(path) and reload with AutoTokenizer.from_pretrained(path).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"special token {s!r} got id {tok.token_to_id(s)}, expected {i}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=PAD,
        extra_special_tokens=[ENDOFTEXT, IM_START], chat_template=CHAT_TEMPLATE,
        model_max_length=1024, clean_up_tokenization_spaces=False)


def tokenizer_corpus(examples: Sequence[dict[str, str]]) -> list[str]:
    """Texts to train the tokenizer on: the problems, the solutions and the chat roles."""
    texts = [e["problem"] for e in examples] + [e["solution"] for e in examples]
    return texts + ["user\n", "assistant\n"] * max(2, len(examples) // 10)


# ---------------------------------------------------------------------------------------------
# Models


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """Qwen3 architecture of a toy model (tied embeddings; head_dim = hidden // heads)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int


# Measured with the default ToySettings on the 2-core CPU (tools/make_toy.py, manifest.json):
# the teacher (0.35 M parameters, 700 steps of 32 sequences) answers 98% of the test problems
# greedily; the student (0.12 M, 500 steps) 31% greedily and 18% / 22% of samples at
# temperature 1.0 / 0.6, with right and wrong samples for about half of the problems.
TEACHER_SIZE = ModelSize(hidden_size=96, num_layers=3, num_heads=3, num_kv_heads=1,
                         intermediate_size=288)
STUDENT_SIZE = ModelSize(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                         intermediate_size=192)


def model_config(size: ModelSize, tokenizer, max_positions: int = 256):
    """scope_jax.models.ModelConfig (model_type "qwen3") for `size` and `tokenizer`'s vocabulary
    and special tokens (eos = <|im_end|>, pad = <pad>, no bos)."""
    if size.hidden_size % size.num_heads or size.num_heads % size.num_kv_heads:
        raise ValueError(f"{size}: hidden_size must divide by num_heads, num_heads by num_kv_heads")
    return ModelConfig(
        model_type="qwen3", vocab_size=len(tokenizer), hidden_size=size.hidden_size,
        num_layers=size.num_layers, num_heads=size.num_heads, num_kv_heads=size.num_kv_heads,
        head_dim=size.hidden_size // size.num_heads, intermediate_size=size.intermediate_size,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True, qk_norm=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_position_embeddings=max_positions)


# ---------------------------------------------------------------------------------------------
# Supervised fine-tuning on worked solutions


def prompt_text(problem: str, tokenizer) -> str:
    """The chat-templated prompt of one problem, exactly as the trainer builds it
    (scope_jax.data.build_prompt with instruction=TOY_INSTRUCTION)."""
    return build_prompt(problem, tokenizer, instruction=TOY_INSTRUCTION)


def encode_sft(examples: Sequence[dict[str, str]], tokenizer, length: int | None = None):
    """Prompt + worked solution + EOS for each example, right-padded.

    The prompt and the response are tokenized separately and concatenated, so the boundary is
    exactly where sampling starts. length: pad to this many tokens (None: the longest).
    Returns numpy (ids int32 [N, L], attention_mask bool [N, L], response_mask bool [N, L]);
    response_mask is True on the response tokens (solution and the EOS <|im_end|>), the tokens
    the loss is taken on.
    """
    prompts = tokenizer([prompt_text(e["problem"], tokenizer) for e in examples],
                        add_special_tokens=False)["input_ids"]
    responses = tokenizer([e["solution"] for e in examples], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    longest = max(len(p) + len(r) + 1 for p, r in zip(prompts, responses))
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"encode_sft: a sequence has {longest} tokens > length {length}")
    ids = np.full((len(examples), length), tokenizer.pad_token_id, np.int32)
    attn = np.zeros((len(examples), length), bool)
    resp = np.zeros((len(examples), length), bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = p + r + [eos]
        ids[i, :len(seq)] = seq
        attn[i, :len(seq)] = True
        resp[i, len(p):len(seq)] = True
    return ids, attn, resp


def _decay_mask(params):
    # No weight decay on norm gains (1-D); decay on matrices and the embedding.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def sft_train(model, ids, attention_mask, response_mask, *, steps: int, batch_size: int,
              lr: float, warmup: int, seed: int, weight_decay: float = 0.01,
              log_every: int = 0) -> dict:
    """Trains `model` (a scope_jax.models.Transformer, updated in place) by maximum likelihood of
    the response tokens: loss = scope_jax.losses.kd_loss (token mean NLL) on
    token_logprobs(model.hidden(ids[:, :-1]), model.lm_head_weight(), ids[:, 1:]).

    ids / attention_mask / response_mask: numpy [N, L] from encode_sft. Batches of batch_size
    rows are drawn by a seeded permutation per epoch. Optimiser: AdamW (b2 0.98), linear
    warmup then cosine decay to lr / 10, global-norm clipping at 1. One jitted step with the
    parameters and optimiser state donated.
    log_every: print the loss every this many steps (0: silent).
    Returns {"losses": list of per-step float losses, "seconds": wall time incl. compilation}.
    """
    n = ids.shape[0]
    if n < batch_size:
        raise ValueError(f"sft_train: {n} sequences < batch_size {batch_size}")
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, warmup), max(steps, warmup + 1),
                                                  end_value=lr / 10)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b2=0.98, weight_decay=weight_decay,
                                 mask=_decay_mask))
    graphdef, params = nnx.split(model)
    opt_state = tx.init(params)

    def loss_fn(p, x, a, r):
        m = nnx.merge(graphdef, p)
        h = m.hidden(x[:, :-1], attention_mask=a[:, :-1])
        lp = token_logprobs(h, m.lm_head_weight(), x[:, 1:])
        return kd_loss(lp, r[:, 1:])[0]

    def step(p, s, x, a, r):
        loss, g = jax.value_and_grad(loss_fn)(p, x, a, r)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    start = time.perf_counter()
    losses, order, per_epoch = [], None, n // batch_size
    for i in range(steps):
        epoch, k = divmod(i, per_epoch)
        if k == 0:
            order = np.random.default_rng([seed, epoch]).permutation(n)
        idx = np.sort(order[k * batch_size:(k + 1) * batch_size])
        params, opt_state, loss = step(params, opt_state, jnp.asarray(ids[idx]),
                                       jnp.asarray(attention_mask[idx]),
                                       jnp.asarray(response_mask[idx]))
        losses.append(loss)
        if log_every and (i + 1) % log_every == 0:
            print(f"  step {i + 1}/{steps} loss {float(loss):.4f} "
                  f"({time.perf_counter() - start:.1f}s)", flush=True)
    losses = [float(x) for x in jax.device_get(losses)]
    nnx.update(model, params)
    if not all(np.isfinite(losses)):
        bad = int(np.argmin(np.isfinite(losses))) + 1
        raise FloatingPointError(f"sft_train: non-finite loss at step {bad} (lower lr?)")
    return {"losses": losses, "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate(model, tokenizer, examples: Sequence[dict[str, str]], *, temperature: float = 0.0,
             num_samples: int = 1, seed: int = 0, max_new_tokens: int = 64,
             batch_size: int = 2048, top_p: float | None = None, top_k: int | None = None
             ) -> dict:
    """Accuracy of `model` on `examples` through scope_jax.rollout.generate_and_verify (the
    static engine; stop ids by sampling.stop_ids, pad id the tokenizer's) and the project's
    verifier (scope_jax.verifiers.math.verify on the last \\boxed{} against the gold answer).

    examples: dicts with "problem" and "answer" (str). temperature 0: greedy (num_samples
    should then be 1); > 0: `key`-seeded sampling, optionally truncated by top_k / top_p.
    batch_size: prompts per generate call (each gives batch_size * num_samples rows).
    Runs the verifier in this process (InlineVerifier), so call it from the main thread
    (verify's time limit is a SIGALRM timer). Returns {"accuracy": mean reward over all
    samples, "per_problem": float list [len(examples)] of the fraction of correct samples,
    "mixed": fraction of problems with both correct and wrong samples, "responses": the
    decoded first response of each of the first 8 problems, for a look}.
    """
    if not examples:
        raise ValueError("evaluate: no examples")

    prompts = tokenizer([prompt_text(e["problem"], tokenizer) for e in examples],
                        add_special_tokens=False)["input_ids"]
    settings = rollout.settings_for(model.config, tokenizer, max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_k=top_k, top_p=top_p)
    engine, verifier = rollout.make_engine("static", model, settings), InlineVerifier()
    rewards = []
    key = jax.random.key(seed)
    for start in range(0, len(prompts), batch_size):
        key, sub = jax.random.split(key)
        done = rollout.generate_and_verify(
            engine, prompts[start:start + batch_size], [e["answer"] for e in examples[start:start + batch_size]],
            verifier, tokenizer, num_samples=num_samples, key=sub if temperature > 0 else None)
        rewards += [r.reward for r in done.results()]
        if start == 0:
            shown = done.texts[:8 * num_samples:num_samples]
    per_problem = np.asarray(rewards).reshape(len(examples), num_samples).mean(1)
    return {"accuracy": float(np.mean(rewards)), "per_problem": per_problem.tolist(),
            "mixed": float(np.mean((per_problem > 0) & (per_problem < 1))), "responses": shown}


# ---------------------------------------------------------------------------------------------
# The machine a build or run happened on


# The vector extensions XLA:CPU generates code for: machines that /proc/cpuinfo names alike
# ("AMD EPYC") can differ here, and with them a build's float results. A long_styles seed-0
# build, same code, settings and package pins, gave a 93.0% teacher before a machine change
# (2026-12-06) and 99.5% after it (2026-12-07); the two machines' extensions were not recorded.
CPU_ISA = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
           "avx512_bf16", "amx_bf16", "asimd", "sve", "sve2")


def machine_info() -> dict:
    """What a toy build's (and a run's) numbers depend on besides the settings: the toy build is
    bitwise reproducible on one machine but not across machines (CPU kernels, float summation
    order), so every result records where it came from.

    Returns {"cpu_model" (first "model name" of /proc/cpuinfo, or platform.processor()),
    "cpu_isa" (the CPU_ISA extensions its "flags" / "Features" line lists, space-separated, or
    "unknown"), "cpu_count", "platform", "python", "jax", "jaxlib", "backend", "xla_flags"}
    (str / int).
    """
    import platform

    import jaxlib

    cpu, flags = "", None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not cpu:
                    cpu = value.strip()
                elif key in ("flags", "Features") and flags is None:
                    flags = set(value.split())
    except OSError:
        pass
    isa = " ".join(x for x in CPU_ISA if x in flags) if flags is not None else "unknown"
    return {"cpu_model": cpu or platform.processor() or "unknown", "cpu_isa": isa,
            "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def format_machine(info: dict) -> str:
    """One line for logs and tables: CPU and its vector extensions, cores, jax/jaxlib, backend,
    XLA_FLAGS. Records written before cpu_isa existed show "isa not recorded"."""
    return (f"{info['cpu_model']} ({info.get('cpu_isa', 'isa not recorded')}), "
            f"{info['cpu_count']} cores, {info['platform']}, "
            f"jax {info['jax']} / jaxlib {info['jaxlib']} on {info['backend']}, "
            f"XLA_FLAGS={info['xla_flags'] or '(unset)'}")


# ---------------------------------------------------------------------------------------------
# Building the toy setup: data, tokenizer, teacher and student checkpoints


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """SFT of one toy model from random init (see sft_train).

    op_keep: the model's training mix, as (op, fraction) pairs: of the training problems that
      contain op, only this seeded fraction is kept (() = all problems). (("*", 0.05),) makes a
      model that saw few products: a blind spot on multiplication (see FAMILIES["blindspot"]).
    op_noise: (op, probability) pairs: in this model's worked solutions, each step with op gets
      its result moved by +-1 with this probability (seeded), and the chain continues from the
      moved value. (("*", 0.6),) makes a model that is *unsure* of products (its mass on a
      product's result is split between the right value and its neighbours) and often wrong
      there (FAMILIES["unsure"]).
    """

    size: ModelSize
    steps: int
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 30
    seed: int = 0  # parameter init, batch order and the op_keep subsample
    op_keep: tuple[tuple[str, float], ...] = ()
    op_noise: tuple[tuple[str, float], ...] = ()
    # Long toy only: this seeded fraction of the model's worked solutions is written in the
    # second style (to_second_style), the rest in the first (FAMILIES["long_styles"]).
    second_style: float = 0.0

    def __post_init__(self):
        for op, frac in self.op_keep + self.op_noise:
            if op not in OPS or not 0.0 <= frac <= 1.0:
                raise ValueError(f"TrainSettings.op_keep/op_noise: ({op!r}, {frac}) needs an op of "
                                 f"{OPS!r} and a fraction in [0, 1]")
        if not 0.0 <= self.second_style <= 1.0:
            raise ValueError(f"TrainSettings.second_style must be in [0, 1], got {self.second_style}")


_STEP = re.compile(r"(\d+)([-+*])(\d+)=(\d+)\.")


def noisy_solutions(examples: Sequence[dict[str, str]], ts: TrainSettings) -> list[dict[str, str]]:
    """The examples with ts.op_noise applied to their worked solutions (see TrainSettings):
    each step "a op b=c." with a listed op gets c moved by +1 or -1 (0 stays >= 0) with the
    op's probability, and later steps continue from the moved value; the boxed answer is the
    chain's last value. Seeded by ts.seed; examples without a noisy op are returned as is.
    Returns a new list of {"problem", "answer", "solution"} (answer: the true answer)."""
    noise = dict(ts.op_noise)
    if not noise:
        return list(examples)
    rng = np.random.default_rng([ts.seed, 11])
    out = []
    for e in examples:
        steps = _STEP.findall(e["solution"])
        value, parts = int(steps[0][0]), []
        for _, op, b, _ in steps:
            new = _apply(value, op, int(b))
            if op in noise and rng.random() < noise[op]:
                new = new + 1 if new == 0 or rng.random() < 0.5 else new - 1
            parts.append(f"{value}{op}{b}={new}.")
            value = new
        out.append({**e, "solution": " ".join(parts) + f" \\boxed{{{value}}}"})
    return out


def training_mix(examples: Sequence[dict[str, str]], ts: TrainSettings) -> list[int]:
    """Indices of the examples a model with settings ts trains on (ts.op_keep; seeded by
    ts.seed). A problem containing several listed ops is kept only if every op's draw keeps it.
    Returns sorted int indices into examples."""
    rng = np.random.default_rng([ts.seed, 7])
    draws = rng.random((len(examples), max(1, len(ts.op_keep))))
    keep = []
    for i, e in enumerate(examples):
        expr = e["problem"]
        if all(draws[i, j] < frac for j, (op, frac) in enumerate(ts.op_keep) if op in expr):
            keep.append(i)
    return keep


@dataclasses.dataclass(frozen=True)
class ToySettings:
    """Everything build_toy does is a pure function of these (and the library versions).

    n_train / n_test: problems in data/train.jsonl / data/test.jsonl (disjoint problem texts).
    eval_temperatures / eval_samples: the student and teacher are also scored by sampling
      eval_samples responses per test problem at each temperature (top-k / top-p off).
    max_new_tokens: response budget for evaluation (the longest worked solution is ~32 tokens).
    """

    difficulty: Difficulty = Difficulty()
    n_train: int = 20000
    n_test: int = 500
    seed: int = 0
    teacher: TrainSettings = TrainSettings(TEACHER_SIZE, steps=700, seed=1)
    student: TrainSettings = TrainSettings(STUDENT_SIZE, steps=500, seed=2)
    eval_temperatures: tuple[float, ...] = (1.0, 0.6)
    eval_samples: int = 4
    max_new_tokens: int = 48


# The toy family. "toy": the original setup (a 98%-greedy teacher). "blindspot": the same task,
# student and teacher architecture, but the teacher saw only 5% of the training problems with a
# product, so it is only moderately stronger than the student and unreliable on products: its
# guidance after a student's error there is bad, which is the paper's section 7 premise
# (recovery falls with teacher perplexity on the prefix). Measure the premise with
# tools/premise.py before comparing methods on it.
FAMILIES: dict[str, ToySettings] = {
    "toy": ToySettings(),
    "blindspot": ToySettings(teacher=TrainSettings(TEACHER_SIZE, steps=700, seed=1,
                                                   op_keep=(("*", 0.05),))),
    # The second design (after "blindspot" showed no fall of recovery with teacher PPL: its
    # teacher is confidently wrong on products): a teacher trained on worked solutions whose
    # product results are off by one 60% of the time, so it is unsure exactly where it is bad.
    "unsure": ToySettings(teacher=TrainSettings(TEACHER_SIZE, steps=700, seed=1,
                                                op_noise=(("*", 0.6),))),
}


# ---------------------------------------------------------------------------------------------
# The long toy (issue 22): a running-state program with resets, long worked solutions, errors
# at any step and recovery by construction. Design record: docs/study_longtoy.md.
#
#     problem:  "Run a=47 b+5 c*2 d-9 e=12 f+9 ... p-3."
#     solution: "a 47. b 47+5=52. c 52*2=104 ..."  (see make_long_example for the exact format)
#
# Each labelled instruction either applies an operation to the running value x (+d, -d, *d with
# one-digit d) or resets x to a new value (=v, two digits at most). The answer is x after the
# last instruction, so an arithmetic slip before a reset does not change the answer: a solution
# can go wrong early and still end right, and a teacher continuing a wrong prefix recovers when
# a reset lies after the cut. The labels (a, b, c, ...) let a tiny transformer find the next
# instruction in the prompt by one induction-head lookup.

LABELS = "abcdefghijklmnopqrstuvwxyz"


@dataclasses.dataclass(frozen=True)
class LongDifficulty:
    """Knobs of the long toy's problem generator (make_long_example).

    min_steps, max_steps: instructions per problem (inclusive), labelled a, b, c, ...
    reset_prob: chance that an instruction after the first is a reset "=v" (the first always is).
    max_operand: operands of +, -, * are drawn from [1, max_operand] (products need >= 2).
    max_value: every running value, reset value and the answer lies in [0, max_value].
    """

    min_steps: int = 16
    max_steps: int = 24
    reset_prob: float = 0.15
    max_operand: int = 9
    max_value: int = 99

    def __post_init__(self):
        if not 2 <= self.min_steps <= self.max_steps <= len(LABELS):
            raise ValueError(f"LongDifficulty: need 2 <= min_steps <= max_steps <= {len(LABELS)}, "
                             f"got {self.min_steps}, {self.max_steps}")
        if not 0.0 <= self.reset_prob < 1.0:
            raise ValueError(f"LongDifficulty: reset_prob must be in [0, 1), got {self.reset_prob}")
        if not 2 <= self.max_operand <= self.max_value:
            raise ValueError(f"LongDifficulty: need 2 <= max_operand <= max_value, got "
                             f"{self.max_operand}, {self.max_value}")


def make_long_example(rng: random.Random, difficulty: LongDifficulty = LongDifficulty()
                      ) -> dict[str, str]:
    """One long-toy problem drawn with `rng` (a random.Random; advanced in place).

    problem "Run a=47 b+5 c*2 d-9 e=12."; solution, one clause per instruction:
    "a 47. b 47+5=52. c 52*2=104. ..." for operations ("<label> <x><op><d>=<new>.") and
    "e 12." for resets ("<label> <v>."), then " \\boxed{<x>}". Every value stays in
    [0, max_value]: an operation that would leave it is redrawn (a product needs d >= 2).
    Returns {"problem", "answer", "solution"} (str).
    """
    d = difficulty
    num_steps = rng.randint(d.min_steps, d.max_steps)
    value = rng.randint(1, d.max_value)
    instr, clauses = [f"a={value}"], [f"a {value}."]
    for label in LABELS[1:num_steps]:
        if rng.random() < d.reset_prob:
            value = rng.randint(1, d.max_value)
            instr.append(f"{label}={value}")
            clauses.append(f"{label} {value}.")
            continue
        while True:  # +1 and -1 are always possible somewhere in [0, max_value], so this ends
            op, b = rng.choice(OPS), rng.randint(1, d.max_operand)
            new = _apply(value, op, b)
            if not (op == "*" and b == 1) and 0 <= new <= d.max_value:
                break
        instr.append(f"{label}{op}{b}")
        clauses.append(f"{label} {value}{op}{b}={new}.")
        value = new
    return {"problem": "Run " + " ".join(instr) + ".", "answer": str(value),
            "solution": " ".join(clauses) + f" \\boxed{{{value}}}"}


def long_live_steps(problem: str) -> int:
    """Instructions of a long-toy problem after its last reset (the steps the answer depends
    on; 0 when the last instruction is a reset). problem: make_long_example's "problem"."""
    instr = problem.removeprefix("Run ").rstrip(".").split()
    last_reset = max(i for i, x in enumerate(instr) if "=" in x)
    return len(instr) - 1 - last_reset


# The model sizes stay the toy's (TEACHER_SIZE, STUDENT_SIZE): the task changes, not the
# models. Iteration 3 (docs/study_longtoy.md, 2026-12-05): values up to 19 and 1,500 SFT steps
# per model, because at 400-500 steps the models had not yet learned to look the instruction up
# in the prompt (its operation and operand stayed at chance). Measured by the build's own
# evaluation (2026-12-06, seeds 0 / 1): teacher 93 / 87% greedy, student 14 / 20% at T = 0.6.
# A build takes ~17 min on an idle 2-core machine (over the issue's ~5-minute budget).
LONG_SETTINGS = ToySettings(
    difficulty=LongDifficulty(max_value=19), n_train=20000, n_test=200,
    teacher=TrainSettings(TEACHER_SIZE, steps=1500, batch_size=16, seed=1),
    student=TrainSettings(STUDENT_SIZE, steps=1500, batch_size=16, seed=2),
    eval_temperatures=(0.6,), eval_samples=2, max_new_tokens=320)
FAMILIES["long"] = LONG_SETTINGS

_LONG_OP_CLAUSE = re.compile(r"\b([a-z]) (\d+)([-+*])(\d+)=(\d+)\.")
_LONG_RESET_CLAUSE = re.compile(r"\b([a-z]) (\d+)\.")


def to_second_style(solution: str) -> str:
    """A long-toy worked solution rewritten in the second style: the same clauses, values and
    order with other punctuation, "b 47+5=52." -> "b:47+5>52;" and "e 12." -> "e:12;" (the
    boxed answer unchanged), so both styles have the same length in tokens and the same
    arithmetic. A model that never saw the second style finds three tokens of every clause
    implausible (iteration 2 of docs/study_longtoy.md)."""
    out = _LONG_OP_CLAUSE.sub(r"\1:\2\3\4>\5;", solution)
    return _LONG_RESET_CLAUSE.sub(r"\1:\2;", out)


def second_style_solutions(examples: Sequence[dict[str, str]], ts: TrainSettings
                           ) -> list[dict[str, str]]:
    """The examples with a seeded ts.second_style fraction of their long-toy solutions in the
    second style (to_second_style); seeded by ts.seed. Returns a new list (the examples as they
    are when ts.second_style is 0)."""
    if not ts.second_style:
        return list(examples)
    draws = np.random.default_rng([ts.seed, 13]).random(len(examples))
    return [{**e, "solution": to_second_style(e["solution"])} if u < ts.second_style else e
            for e, u in zip(examples, draws)]


# Iteration 2 (docs/study_longtoy.md): the same task and the same teacher (bitwise: same data,
# tokenizer and seeds), but the student learned half of its worked solutions in a second style
# the teacher never saw, as a student distilled from another model family writes its own way.
FAMILIES["long_styles"] = dataclasses.replace(
    LONG_SETTINGS, student=dataclasses.replace(LONG_SETTINGS.student, second_style=0.5))


def toy_settings(family: str = "toy", seed: int = 0) -> ToySettings:
    """FAMILIES[family] with every seed of the build (data and test split, tokenizer, both
    models' init, batch order and training mix) shifted by `seed`; seed 0 is FAMILIES[family]
    itself, so existing builds stay valid."""
    if family not in FAMILIES:
        raise ValueError(f"unknown toy family {family!r}; choose from {sorted(FAMILIES)}")
    s = FAMILIES[family]
    if seed == 0:
        return s
    return dataclasses.replace(
        s, seed=s.seed + seed,
        teacher=dataclasses.replace(s.teacher, seed=s.teacher.seed + 1000 * seed),
        student=dataclasses.replace(s.student, seed=s.student.seed + 1000 * seed))


def _settings_dict(settings: ToySettings) -> dict:
    # JSON round trip so that tuples compare equal to the lists read back from manifest.json.
    d = json.loads(json.dumps(dataclasses.asdict(settings)))
    # Empty training-mix knobs are left out, so builds made before they existed stay reusable.
    for name in ("teacher", "student"):
        for knob in ("op_keep", "op_noise", "second_style"):
            if not d[name][knob]:
                del d[name][knob]
    return d


def toy_paths(out_dir: str | os.PathLike) -> dict[str, str]:
    """The files build_toy writes under out_dir: {"dir", "train", "test", "tokenizer",
    "teacher", "student", "manifest"} (absolute paths)."""
    out = os.path.abspath(os.fspath(out_dir))
    return {"dir": out, "train": os.path.join(out, "data", "train.jsonl"),
            "test": os.path.join(out, "data", "test.jsonl"),
            "tokenizer": os.path.join(out, "tokenizer"), "teacher": os.path.join(out, "teacher"),
            "student": os.path.join(out, "student"),
            "manifest": os.path.join(out, "manifest.json")}


def missing_parts(paths: dict[str, str]) -> list[str]:
    """The parts of a finished build (toy_paths' data, tokenizer, models and manifest) that are
    not on disk. An archived study keeps the manifest and drops the models, so a manifest alone
    does not make a build usable."""
    return [paths[k] for k in ("manifest", "train", "test", "tokenizer", "teacher", "student")
            if not os.path.exists(paths[k])]


def _reusable(paths: dict[str, str], settings: ToySettings) -> bool:
    """True when a finished build with the same settings is in place (manifest.json is written
    last, so its presence means the build completed)."""
    if not os.path.isfile(paths["manifest"]):
        return False
    try:
        with open(paths["manifest"]) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{paths['manifest']}: unreadable ({e}); rebuild with force=True "
                         "(tools/make_toy.py --force)") from None
    if manifest.get("settings") != _settings_dict(settings):
        raise ValueError(f"{paths['manifest']}: the toy models there were built with other "
                         "settings than the ones asked for; rebuild with force=True "
                         "(tools/make_toy.py --force) or use another output directory")
    missing = missing_parts(paths)
    if missing:
        raise ValueError(f"{paths['manifest']}: the build is incomplete, missing {missing}; "
                         "rebuild with force=True (tools/make_toy.py --force)")
    return True


def _max_positions(sft_length: int) -> int:
    """max_position_embeddings of a toy model whose longest SFT sequence has sft_length tokens:
    the smallest power of two >= sft_length + 64 (room for sampling past the longest solution),
    and at least 256, the value every build before the long toy used (so they stay identical).
    scope_jax.evaluation caps max_new_tokens by it."""
    return max(256, 1 << (sft_length + 63).bit_length())


def _train_model(name: str, ts: TrainSettings, tokenizer, data, path: str, tokenizer_dir: str,
                 log_every: int) -> tuple[Transformer, dict]:
    """SFT of one model from random init, saved with the tokenizer files; returns (model,
    {"parameters", "train_seconds", "final_loss"})."""
    model = Transformer(model_config(ts.size, tokenizer, _max_positions(data[0].shape[1])),
                        rngs=nnx.Rngs(ts.seed))
    n_params = int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
    if log_every:
        print(f"training the {name} ({n_params} parameters, {ts.steps} steps)", flush=True)
    result = sft_train(model, *data, steps=ts.steps, batch_size=ts.batch_size, lr=ts.lr,
                       warmup=ts.warmup, seed=ts.seed, log_every=log_every)
    save_hf(model, path, copy_files_from=tokenizer_dir)
    return model, {"parameters": n_params, "train_seconds": round(result["seconds"], 2),
                   "final_loss": round(float(np.mean(result["losses"][-20:])), 4)}


def _accuracy_by_op(examples: Sequence[dict[str, str]], per_problem: Sequence[float]) -> dict:
    """Where a blind spot shows: mean accuracy on the problems with and without each op.
    Returns {"with +": float | None, "without +": ..., ...} (None: no such problem)."""
    per = np.asarray(per_problem, np.float64)
    out = {}
    for op in OPS:
        has = np.array([op in e["problem"] for e in examples])
        out[f"with {op}"] = float(per[has].mean()) if has.any() else None
        out[f"without {op}"] = float(per[~has].mean()) if (~has).any() else None
    return out


def _copy_teacher(source_dir: str, settings: ToySettings, paths: dict[str, str]
                  ) -> tuple[Transformer, dict]:
    """The teacher of the finished build in source_dir, copied to paths["teacher"], when that
    build's settings equal `settings` in everything but the student and its tokenizer and
    training data are byte-identical to the ones just written (so its teacher is the model this
    build would train: SFT is deterministic on one machine). Returns (model, info) as
    _train_model, info["copied_from"] naming the source. Raises ValueError otherwise."""
    src = toy_paths(source_dir)
    try:
        with open(src["manifest"]) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"teacher_from={source_dir!r}: no finished build there ({e})") from None
    ours, theirs = _settings_dict(settings), dict(manifest["settings"])
    ours.pop("student"), theirs.pop("student", None)
    if ours != theirs:
        raise ValueError(f"teacher_from={source_dir!r}: that build's settings differ from these in "
                         "more than the student; its teacher is not this build's")
    for key in ("train", "tokenizer"):
        a, b = paths[key], src[key]
        names = sorted(os.listdir(a)) if os.path.isdir(a) else [None]
        if os.path.isdir(a) and (not os.path.isdir(b) or sorted(os.listdir(b)) != names):
            raise ValueError(f"teacher_from={source_dir!r}: {b} holds other files than {a}")
        for n in names:
            fa, fb = (a, b) if n is None else (os.path.join(a, n), os.path.join(b, n))
            with open(fa, "rb") as f, open(fb, "rb") as g:
                if f.read() != g.read():
                    raise ValueError(f"teacher_from={source_dir!r}: {fb} differs from {fa}")
    shutil.copytree(src["teacher"], paths["teacher"])
    info = dict(manifest["models"]["teacher"])
    info["copied_from"] = src["dir"]
    return load_hf(paths["teacher"]), info


def build_toy(out_dir: str | os.PathLike = "runs/toy", force: bool = False,
              settings: ToySettings = ToySettings(), verbose: bool = True,
              teacher_from: str | os.PathLike | None = None) -> dict[str, str]:
    """Builds (or reuses) the toy setup under out_dir and returns toy_paths(out_dir).

    Writes data/train.jsonl and data/test.jsonl (read them with
    scope_jax.data.load_examples(path, spec=TOY_SPEC)), tokenizer/ (AutoTokenizer), teacher/ and
    student/ (Hugging Face Qwen3 checkpoints with the tokenizer files, trained from random init
    by SFT on the worked solutions with sft_train), and manifest.json last: the settings, the
    timings and the measured accuracies on the test split (greedy, and sampled at
    settings.eval_temperatures).
    A complete build with the same settings is reused unless force=True; one made with other
    settings, or a broken one, raises ValueError asking for force=True. With force=True the
    files above are deleted first (nothing else in out_dir is touched).
    teacher_from: a finished build whose settings differ only in the student (e.g.
    FAMILIES["long_styles"] from FAMILIES["long"] at the same seed): its teacher is copied
    instead of trained again (_copy_teacher checks that it is this build's teacher).
    """
    paths = toy_paths(out_dir)
    if not force and _reusable(paths, settings):
        if verbose:
            print(f"reusing the toy models in {paths['dir']} (force=True rebuilds them)")
        return paths
    start = time.perf_counter()
    for key in ("manifest", "train", "test", "tokenizer", "teacher", "student"):
        p = paths[key]
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)

    train, test = split_examples(settings.n_train, settings.n_test, settings.seed,
                                 settings.difficulty)
    data.write_jsonl(paths["train"], train)
    data.write_jsonl(paths["test"], test)
    tokenizer = train_tokenizer(tokenizer_corpus(train))
    tokenizer.save_pretrained(paths["tokenizer"])
    sft = encode_sft(train, tokenizer)
    prompt_lengths = sft[2].argmax(1)
    mixes = {name: training_mix(train, getattr(settings, name)) for name in ("teacher", "student")}
    noisy = {name: second_style_solutions(noisy_solutions(train, getattr(settings, name)),
                                          getattr(settings, name))
             for name in ("teacher", "student")}
    seconds = {"data_and_tokenizer": round(time.perf_counter() - start, 2)}
    log_every = 100 if verbose else 0

    models, info = {}, {}
    for name in ("teacher", "student"):
        rows = mixes[name]
        ts = getattr(settings, name)
        own = sft if not (ts.op_noise or ts.second_style) else encode_sft(noisy[name], tokenizer)
        mix = own if len(rows) == len(train) else tuple(a[rows] for a in own)
        if name == "teacher" and teacher_from is not None:
            models[name], info[name] = _copy_teacher(os.fspath(teacher_from), settings, paths)
        else:
            models[name], info[name] = _train_model(name, getattr(settings, name), tokenizer, mix,
                                                    paths[name], paths["tokenizer"], log_every)
        info[name]["training_problems"] = len(rows)

    t = time.perf_counter()
    accuracy, mixed, by_op = {}, {}, {}
    ev = dict(max_new_tokens=settings.max_new_tokens)
    for name, model in models.items():
        greedy = evaluate(model, tokenizer, test, **ev)
        accuracy[name] = {"greedy": greedy["accuracy"]}
        by_op[name] = _accuracy_by_op(test, greedy["per_problem"])
        for i, temp in enumerate(settings.eval_temperatures):
            r = evaluate(model, tokenizer, test, temperature=temp,
                         num_samples=settings.eval_samples, seed=settings.seed + 1000 + i, **ev)
            accuracy[name][f"T={temp}"] = r["accuracy"]
            mixed[f"{name} T={temp}"] = r["mixed"]
        if verbose:
            print(f"{name}: accuracy on {len(test)} test problems {accuracy[name]}", flush=True)
    seconds["evaluation"] = round(time.perf_counter() - t, 2)
    seconds["total"] = round(time.perf_counter() - start, 2)

    manifest = {
        "settings": _settings_dict(settings),
        "instruction": TOY_INSTRUCTION,
        "paths": {k: os.path.relpath(v, paths["dir"]) for k, v in paths.items() if k != "dir"},
        "models": info,
        "accuracy": accuracy,
        "accuracy_note": (f"on data/test.jsonl ({len(test)} problems): greedy, and the mean over "
                          f"{settings.eval_samples} samples per problem at each temperature "
                          "(no top-k / top-p); verifier scope_jax.verifiers.math.verify"),
        "fraction_of_problems_with_mixed_samples": mixed,
        "greedy_accuracy_by_op": by_op,
        "max_prompt_tokens": int(prompt_lengths.max()),
        "max_response_tokens": int((sft[2].sum(1)).max()),
        "max_new_tokens": settings.max_new_tokens,
        "seconds": seconds,
        "backend": f"jax {jax.__version__} on {jax.default_backend()} "
                   f"({os.cpu_count()} CPU cores visible)",
        "machine": machine_info(),
    }
    tmp = paths["manifest"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, paths["manifest"])
    if verbose:
        print(f"toy setup written to {paths['dir']} in {seconds['total']:.0f} s")
    return paths
