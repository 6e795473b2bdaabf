"""A step's rollouts: generate, verify and score them into a `step.Rollouts` batch.

    collector = Collector(cfg=cfg, loader=loader, tokenizer=tok, verifier=verifier, ...)
    batch, packed, info = collector.collect(step, state.params)

Generation and verification go through scope_jax.rollout (one engine, one generate-and-verify
path for every caller); the no-gradient passes (pi_old, GRPO's reference, a co-located
teacher) through scope_jax.scoring; with config.packing the step's rows are planned once
(scope_jax.packing.pack_batch) and that plan serves every scoring pass and the train step.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from scope_jax import algorithms, packing, rollout, sampling
from scope_jax import sharding as shd
from scope_jax.sampling import full_sequences
from scope_jax.step import Rollouts


@dataclasses.dataclass
class Collector:
    """A step's prompts -> a Rollouts batch: generate, verify and score (the old / teacher /
    reference log-probs, as scope_jax.algorithms says the algorithm needs), as a pipeline.

    Built once by train(); `collect(step, params)` runs the stages for one step. The engine
    (scope_jax.rollout.make_engine) samples from `policy`: the student, whose weights each
    step replaces (sync_weights), or for KD the teacher. The prompts go
    in config.pipeline.chunks chunks, generated one after another. With pipeline.overlap, each
    finished chunk's verification (host processes) and, when the teacher is remote
    (config.teacher_url), its teacher scoring start in worker threads while the next chunk
    generates; the chunks are then assembled into one batch (assemble_chunks) for the student's
    passes (pi_old, GRPO's reference) and a co-located teacher's, which stay on this thread
    (LocalTeacher.remote says why), then the teacher's and the verifier's results are awaited.
    Without overlap the same calls run in series on this thread: generation, then the passes,
    then each chunk's teacher scores and verification. The order of work changes, not the math.

    The returned info has each stage's time summed over chunks ("time/<stage>_s": generate,
    verify, score_old, score_teacher, score_ref) and the time the teacher and the verifier added
    to the critical path after the student's passes ("critical/score_teacher_s": the wait for
    the teacher's scores, all of its time when it is co-located or not overlapped;
    "critical/verify_s": the wait for the verifier's labels).
    """

    cfg: Any
    loader: Any  # data.PromptLoader: (prompt ids, gold) of each step
    tokenizer: Any
    verifier: Any  # verifiers.Verifier pool (thread-safe)
    graphdef: Any  # the student's
    score: Callable  # scoring.make_score(cfg) under the mesh
    mesh: Any
    settings: rollout.Settings  # rollout.settings_from_config: budget, temperature, stop and pad ids
    policy: Any  # the model that samples: the student (as loaded), or the teacher for KD
    key: jax.Array  # the run's base PRNG key (each step folds its index in, each chunk its own)
    reference: Any = None  # GRPO's frozen initial student params
    teacher_scorer: Any = None  # scope_jax.teacher.Teacher when the algorithm needs its scores

    def __post_init__(self):
        if int(self.cfg.pipeline.chunks) > 1 and jax.process_count() > 1:
            raise ValueError(f"config.pipeline.chunks={self.cfg.pipeline.chunks}: chunked collection runs in "
                             "one process only (chunks are assembled from local rows); use 1 on several hosts")
        # config.rollout: the engine (static | continuous) and the continuous one's layout and pool.
        self.engine = rollout.engine_from_config(self.cfg, self.policy, self.settings, mesh=self.mesh)

    def collect(self, step: int, params):
        """(Rollouts batch, its packing.Packed rows or None, info dict) of `step`'s prompts under
        the student's `params`. With config.packing the batch's rows come in the plan's order
        (each host's rows permuted within its shards), as the packed step reads them."""
        cfg, alg, s, times = self.cfg, algorithms.get(self.cfg.algo), self.cfg.sampling, {}
        chunks, overlap = int(cfg.pipeline.chunks), bool(cfg.pipeline.overlap)

        def timed(name, fn, *args):
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(*args))
            key = f"time/{name}_s"  # each key is written by one thread only
            times[key] = times.get(key, 0.0) + time.perf_counter() - t0
            return out

        items = self.loader.batch_at(step)
        per_chunk = len(items) // chunks  # prompts; config.validate checks that chunks divides them
        temp = alg.temperature(cfg)
        if alg.samples_with != "teacher":
            self.engine.sync_weights(params)
        stream_teacher = alg.teacher_scores and self.teacher_scorer.remote
        step_key = jax.random.fold_in(self.key, step)

        def rollouts(c, on_finished):
            # Each process decodes and verifies its own rollouts (verification spreads over hosts).
            part = items[c * per_chunk:(c + 1) * per_chunk]
            return rollout.generate_and_verify(
                self.engine, [p for p, _ in part], [a for _, a in part], self.verifier, self.tokenizer,
                num_samples=cfg.num_samples, key=chunk_key(step_key, c, chunks),
                submit=lambda fn, *args: submit(pools[0], "verify", fn, *args),
                on_finished=on_finished)

        def teacher_logprobs(ids, mask, m, **packed):
            return self.teacher_scorer.score(ids, mask, m, **packed).logprobs

        def score_rows(offset):
            """The engine's on_finished for a remote teacher: this process's rows that ended
            (in this chunk, whose first row is `offset`) go to the server while generation
            goes on (every block with the continuous engine; at the chunk's end with static)."""
            def finished(rows, part):
                ids, mask = (np.asarray(x) for x in full_sequences(part))
                scoring.append(([offset + r for r in rows], submit(
                    pools[1], "score_teacher", self.teacher_scorer.score_local, ids, mask,
                    part.tokens.shape[1])))
            return finished

        pools = [concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=p) for p in ("verify", "teacher")]
        submit = ((lambda pool, *a: pool.submit(timed, *a)) if overlap
                  else (lambda pool, *a: _Later(timed, *a)))  # in series: run when awaited
        outs, verifying, scoring = [], [], []
        try:
            for c in range(chunks):  # (several chunks: one process, config.validate)
                done = timed("generate", rollouts, c,
                             score_rows(c * per_chunk * int(cfg.num_samples)) if stream_teacher else None)
                outs.append(done.out)
                verifying.append(done.pending)
            out, shape_info = _trim_responses(assemble_chunks(outs, per_chunk, self.settings.pad_id),
                                              s.max_new_tokens)
            ids, mask = full_sequences(out)
            m = out.tokens.shape[1]
            # The step's one packing plan, shared by every scoring pass below and the step.
            packed = packing.pack_batch(ids, mask, m, self.mesh, int(cfg.packing)) if cfg.packing else None
            on_rows = {} if packed is None else {"packed": packed}
            zeros = jnp.zeros(out.tokens.shape, jnp.float32)
            old, teacher_lp, ref_lp = zeros, zeros, zeros
            if alg.old_logprobs:
                # The sampler's policy_logprobs are at temperature 1; at any other policy
                # temperature the behaviour log-probs come from the training forward pass.
                old = (out.policy_logprobs if temp == 1.0 and not cfg.recompute_old_logprobs
                       else timed("score_old", self.score, self.graphdef, params, ids, mask, m, temp, packed))
            if self.reference is not None:
                ref_lp = timed("score_ref", self.score, self.graphdef, self.reference, ids, mask, m, temp, packed)
            t0 = time.perf_counter()
            if stream_teacher:
                rows = len(shd.local_rows(out.lengths))
                teacher_lp = jnp.asarray(shd.to_global(
                    place_rows([(r, f.result()[0]) for r, f in scoring], rows, m), self.mesh))
            elif alg.teacher_scores:
                teacher_lp = timed("score_teacher", lambda: teacher_logprobs(ids, mask, m, **on_rows))
            if alg.teacher_scores:
                times["critical/score_teacher_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            results = [r for f in verifying for r in f.result()]
            times["critical/verify_s"] = time.perf_counter() - t0
        finally:
            for pool in pools:
                pool.shutdown(wait=True, cancel_futures=True)
        correct = shd.to_global(np.array([r.reward > 0 for r in results]), self.mesh)  # -> the global [B] labels
        batch = Rollouts(input_ids=ids, attention_mask=mask, response_mask=out.response_mask,
                         old_logprobs=old, teacher_logprobs=teacher_lp, ref_logprobs=ref_lp,
                         correct=jnp.asarray(correct), group_ids=out.group_ids)
        reasons = [r.reason for r in results]
        info = {  # this host's rollouts
            "rollouts": int(len(results)),
            "finished_eos": float(np.mean(shd.local_rows(out.finish_reason) == sampling.FINISH_EOS)),
            "verifier_timeouts": float(reasons.count("timeout")),
            **shape_info, **times,
        }
        if packed is None:
            return batch, None, info
        # seq_len and padding: the packed rows'
        info.update(seq_len=float(cfg.packing), padding=packed.plan.padding)
        return packing.permute(batch, packed, self.mesh), packed.packed, info


class _Later:
    """fn(*args) run on the calling thread when its result is first asked for: the in-series
    twin of a worker thread's Future, so that both orders of work share one code path."""

    def __init__(self, fn, *args):
        self._fn, self._args = fn, args

    def result(self):
        if self._fn is not None:
            self._value, self._fn = self._fn(*self._args), None
        return self._value


def chunk_key(step_key: jax.Array, chunk: int, chunks: int) -> jax.Array:
    """The sampling key of prompt chunk `chunk` of a step split into `chunks`: the step's key
    itself for one chunk (the key a step had before chunking), else the step's key with the
    chunk's index folded in. The rollouts depend on (step, chunk, chunks) only."""
    return step_key if chunks == 1 else jax.random.fold_in(step_key, chunk)


def assemble_chunks(outs: list, prompts_per_chunk: int, pad_id: int):
    """SamplerOutputs of consecutive prompt chunks -> one SamplerOutput of all their rows in
    order, what sampling them together would have laid out: each chunk's prompts left-padded
    with pad_id to the widest chunk's prompt bucket (prompt_lengths keep the padding out of the
    attention mask), group ids offset by the prompts of the chunks before it. Every chunk's
    responses have the sampler's max_new_tokens positions, so they line up as they are (trim
    the assembled output with _trim_responses). One chunk comes back as it is."""
    if len(outs) == 1:
        return outs[0]
    width = max(o.prompt_ids.shape[1] for o in outs)
    parts = [o.replace(prompt_ids=jnp.pad(o.prompt_ids, ((0, 0), (width - o.prompt_ids.shape[1], 0)),
                                          constant_values=pad_id),
                       group_ids=o.group_ids + c * prompts_per_chunk) for c, o in enumerate(outs)]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)


def place_rows(parts: list, rows: int, num_response: int) -> np.ndarray:
    """Scores streamed in parts -> this process's batch: parts = [(row indices, f32 [k, w])]
    (a part's response-aligned scores, w >= num_response, or fewer columns when zero past
    them) -> f32 [rows, num_response], each part's rows at their indices, zero elsewhere."""
    out = np.zeros((rows, num_response), np.float32)
    for idx, x in parts:
        w = min(num_response, x.shape[1])
        out[np.asarray(idx, int), :w] = np.asarray(x)[:, :w]
    return out


def _trim_responses(out, max_new_tokens: int):
    """Cuts the rollouts' response positions to response_bucket(longest response), so the
    scoring passes and the step process what the rollouts hold, not prompt bucket +
    max_new_tokens. Returns (out, {"seq_len": the step's tokens per row, "padding": this host's
    share of padding positions}); seq_len is the same on every host (global longest)."""
    lengths, prompts = shd.local_rows(out.lengths), shd.local_rows(out.prompt_lengths)
    longest = int(shd.max_over_hosts(lengths.max()))  # every host must cut to the same shape
    m = response_bucket(longest, int(max_new_tokens))
    out = out.replace(tokens=out.tokens[:, :m], response_mask=out.response_mask[:, :m],
                      logprobs=out.logprobs[:, :m], policy_logprobs=out.policy_logprobs[:, :m])
    seq_len = out.prompt_ids.shape[1] + m
    real = float(lengths.sum() + prompts.sum())
    return out, {"seq_len": float(seq_len), "padding": 1.0 - real / (len(lengths) * seq_len)}


def response_bucket(length: int, cap: int, minimum: int = 16) -> int:
    """The response positions a step keeps when its longest response has `length` tokens: the
    smallest of 2^k and 1.5 * 2^k that holds it (at least `minimum`, at most `cap`), so the
    train step compiles for about two shapes per doubling of the response length."""
    b = minimum
    while b < length:
        b = b * 3 // 2 if b & (b - 1) == 0 else b // 3 * 4  # 2^k -> 1.5 * 2^k -> 2^(k+1)
    return min(b, cap)
