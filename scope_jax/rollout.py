"""One rollout interface for every caller: training's Collector, evaluation, the toy, the tools.

    settings = rollout.Settings(max_new_tokens=512, temperature=0.6, stop_ids=(2,), pad_id=0)
    engine = rollout.make_engine("static", model, settings, mesh=None)
    engine.sync_weights(params)            # the student's current params (once per step)
    out = engine.generate(prompts, num_samples=8, key=key)   # sampling.SamplerOutput

`Settings` holds everything that decides what a rollout is (budget, temperature, top-k / top-p,
repetition penalty, stop ids, pad id); `settings_from_config` builds it from a training config
in one place, so no caller assembles sampler keyword arguments itself.

Engines (config.rollout.engine):
  * "static": scope_jax.sampling.generate, the whole batch decoded together until its last row
    ends (the reference the other engines are tested against).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scope_jax import sampling
from scope_jax.sampling import SamplerOutput

ENGINES = ("static",)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a rollout is. max_new_tokens: the response budget M (every row's cap);
    temperature 0 = greedy; top_k / top_p None = off; repetition_penalty 1.0 = off;
    stop_ids: the ids that end a response (sampling.stop_ids' rule); pad_id: written after a
    row ends and used to pad prompts (always masked out)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0

    def __post_init__(self):
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))


def settings_from_config(cfg, *, model_config=None, tokenizer=None, temperature: float | None = None,
                         checkpoint: str | None = None) -> Settings:
    """The training run's rollout settings from config.sampling: stop ids by sampling.stop_ids
    (tokenizer, model config, `checkpoint`'s generation_config.json, config.sampling.eos_ids),
    pad id the tokenizer's (0 without one: padding is masked everywhere). `temperature`
    overrides config.sampling.temperature (the algorithm's rollout temperature)."""
    s = cfg.sampling
    stops = sampling.stop_ids(model_config, tokenizer, s.eos_ids or (), checkpoint=checkpoint)
    pad = getattr(tokenizer, "pad_token_id", None)
    return Settings(
        max_new_tokens=int(s.max_new_tokens),
        temperature=float(s.temperature if temperature is None else temperature),
        top_k=int(s.top_k) or None, top_p=None if float(s.top_p) >= 1.0 else float(s.top_p),
        repetition_penalty=float(s.repetition_penalty), stop_ids=tuple(stops),
        pad_id=0 if pad is None else int(pad))


class RolloutEngine(Protocol):
    """What every engine offers. generate's rows: prompt j's samples at j*num_samples ..
    (j+1)*num_samples-1; `max_new_tokens` (optional, one int per output row) caps each row
    below settings.max_new_tokens; `key` is needed when settings.temperature > 0, and row i's
    tokens depend on (key, i) only."""

    settings: Settings

    def generate(self, prompts: Sequence[Sequence[int]], *, num_samples: int = 1,
                 key: jax.Array | None = None,
                 max_new_tokens: Sequence[int] | None = None) -> SamplerOutput: ...

    def sync_weights(self, params) -> None: ...


def row_budgets(max_new_tokens, rows: int, cap: int) -> np.ndarray | None:
    """Per-row budgets int32 [rows] checked against the settings' cap, or None for none given."""
    if max_new_tokens is None:
        return None
    b = np.asarray(max_new_tokens)
    if b.shape != (rows,) or not np.issubdtype(b.dtype, np.integer):
        raise ValueError(f"generate: max_new_tokens must be {rows} ints (one per output row), "
                         f"got shape {b.shape} dtype {b.dtype}")
    if b.min() < 1 or b.max() > cap:
        raise ValueError(f"generate: per-row max_new_tokens must be in [1, {cap}] "
                         f"(settings.max_new_tokens), got min {b.min()} max {b.max()}")
    return b.astype(np.int32)


def cap_rows(out: SamplerOutput, budgets: np.ndarray, pad_id: int) -> SamplerOutput:
    """`out` with row i cut to budgets[i] tokens (finish 'length' where the cut removed its end):
    the per-row budget of an engine that decodes every row to the same budget."""
    b = jnp.asarray(budgets)
    cut = out.lengths > b
    keep = jnp.arange(out.tokens.shape[1])[None, :] < b[:, None]
    mask = out.response_mask & keep
    pad = jnp.asarray(pad_id, out.tokens.dtype)
    return out.replace(
        tokens=jnp.where(keep, out.tokens, pad), response_mask=mask,
        lengths=jnp.minimum(out.lengths, b),
        finish_reason=jnp.where(cut, sampling.FINISH_LENGTH, out.finish_reason),
        logprobs=jnp.where(mask, out.logprobs, 0.0),
        policy_logprobs=jnp.where(mask, out.policy_logprobs, 0.0))


class StaticEngine:
    """sampling.generate behind the engine interface: the whole batch decodes together (per-row
    budgets cut the rows afterwards; they do not shorten the decode)."""

    def __init__(self, model, settings: Settings, mesh=None):
        self.settings, self.mesh = settings, mesh
        self.graphdef, self.params = nnx.split(model)

    def sync_weights(self, params) -> None:
        self.params = params

    def generate(self, prompts, *, num_samples=1, key=None, max_new_tokens=None) -> SamplerOutput:
        s = self.settings
        budgets = row_budgets(max_new_tokens, len(prompts) * num_samples, s.max_new_tokens)
        out = sampling.generate(
            nnx.merge(self.graphdef, self.params), prompts, num_samples=num_samples,
            max_new_tokens=s.max_new_tokens if budgets is None else int(budgets.max()),
            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, eos_ids=list(s.stop_ids),
            pad_id=s.pad_id, key=key, repetition_penalty=s.repetition_penalty,
            mesh=self.mesh if self.mesh is not None and self.mesh.size > 1 else None)
        return out if budgets is None else cap_rows(out, budgets, s.pad_id)


def make_engine(kind: str, model, settings: Settings, mesh=None) -> RolloutEngine:
    """The rollout engine `kind` (one of ENGINES) for `model` (its current weights; replace them
    with sync_weights) under `settings`, on `mesh` (None: one device)."""
    if kind == "static":
        return StaticEngine(model, settings, mesh)
    raise ValueError(f"rollout engine {kind!r}: expected one of {ENGINES}")


# --------------------------------------------------------------------------------------------
# The one generate-and-verify path (the Collector, evaluation, the toy, tools/premise.py).
# --------------------------------------------------------------------------------------------


class Done:
    """An already computed value behind a Future's result(): generate_and_verify's default
    `submit` (verification on the calling thread, in order)."""

    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value

    def done(self) -> bool:
        return True


def _run_now(fn, *args):
    return Done(fn(*args))


@dataclasses.dataclass
class Verified:
    """One generate_and_verify call: `out` the engine's SamplerOutput (every row it generated,
    filler rows included); `texts` this process's responses of the real prompts, decoded with
    special tokens skipped (row j * num_samples + s: prompt j's sample s); `pending`.result()
    their VerifyResults in the same order (a Future when verification runs elsewhere)."""

    out: SamplerOutput
    texts: list[str]
    pending: object

    def results(self) -> list:
        return self.pending.result()


def generate_and_verify(engine: RolloutEngine, prompts: Sequence[Sequence[int]], golds: Sequence,
                        verifier, tokenizer, *, num_samples: int = 1, key: jax.Array | None = None,
                        submit=_run_now) -> Verified:
    """Samples `num_samples` responses to each prompt with `engine` (its Settings: budget,
    temperature, stop ids, pad id), decodes them and verifies each against its prompt's gold.

    Args:
      prompts: token id lists; the first len(golds) are real, any after them are filler
        (copies that keep a batch's shape fixed): generated, never decoded or verified.
      golds: one gold answer per real prompt (as the verifier takes them).
      verifier: an object with verify_batch(texts, golds) -> list[VerifyResult]
        (scope_jax.verifiers.Verifier, InlineVerifier).
      submit: submit(fn, *args) -> an object whose result() is fn(*args): where verification
        runs (default: now, on this thread; a thread pool's submit overlaps it with the next
        generation).
    In a multi-process run each process passes its own prompts and golds, and decodes and
    verifies its own rows.
    """
    if len(golds) > len(prompts):
        raise ValueError(f"generate_and_verify: {len(golds)} golds for {len(prompts)} prompts")
    out = engine.generate(prompts, num_samples=num_samples, key=key)
    rows = sampling.response_lists(out)[:len(golds) * num_samples]
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    row_golds = [g for g in golds for _ in range(num_samples)]
    return Verified(out=out, texts=texts, pending=submit(verifier.verify_batch, texts, row_golds))


def settings_for(model_config, tokenizer, *, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                 eos_ids: Sequence[int] = (), checkpoint: str | None = None) -> Settings:
    """Settings for a caller without a training config (evaluation, the toy, the tools), under
    the same rules as settings_from_config: stop ids by sampling.stop_ids (tokenizer, model
    config, `checkpoint`'s generation_config.json, `eos_ids`), pad id the tokenizer's, else 0."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return Settings(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                    top_k=top_k or None, top_p=top_p, repetition_penalty=float(repetition_penalty),
                    stop_ids=tuple(sampling.stop_ids(model_config, tokenizer, eos_ids, checkpoint=checkpoint)),
                    pad_id=0 if pad is None else int(pad))
