"""The teacher's scores of rollouts: one interface, two implementations.

    teacher = LocalTeacher(model, temperature=1.0)              # co-located: this process's devices
    teacher = RemoteTeacher("http://host:8000/v1")              # an OpenAI-compatible server
    s = teacher.score(input_ids, attention_mask, num_response, top_k=0)
    s.logprobs        # f32 [B, M]   log p_T(response token t | prompt, earlier tokens); 0 off the response
    s.top_ids         # int32 [B, M, K] the teacher's K most likely ids at each response position (top_k=K > 0)
    s.top_logprobs    # f32 [B, M, K]   their log-probs, in descending order

Input layout (scope_jax.sampling.full_sequences): input_ids int32 [B, P + M] is each row's
left-padded prompt followed by its response, right-padded; attention_mask bool [B, P + M] is
True on real tokens; every response starts at column P = T - num_response.

`RemoteTeacher` speaks the subset of the OpenAI completions API that vLLM, SGLang and
`python -m tools.serve_teacher` (scope_jax.serve) share for scoring: each row goes as its token
ids (never re-tokenised text) with echo=True, logprobs=max(1, top_k) (SGLang returns no prompt
log-probs for logprobs=0) and max_tokens=1 (some vLLM versions refuse max_tokens=0 with echo;
the one generated token is ignored). It reads vLLM's `prompt_logprobs` (keyed by token id) when
the server sends it, else the legacy `logprobs.token_logprobs` / `top_logprobs` (ids from
vLLM's `return_tokens_as_token_ids`, "token_id:N" keys). The server scores at temperature 1
(the raw model), so `from_config` refuses a remote teacher at any other teacher temperature.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import re
import time
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scope_jax import algorithms, scoring
from scope_jax import sharding as shd

log = logging.getLogger(__name__)


class TeacherError(RuntimeError):
    """A remote teacher failed (server, request and cause in the message)."""


@dataclasses.dataclass(frozen=True)
class TeacherScores:
    """logprobs f32 [B, M] (0 off the response); top_ids int32 / top_logprobs f32 [B, M, K] or None."""

    logprobs: jax.Array
    top_ids: jax.Array | None = None
    top_logprobs: jax.Array | None = None


class Teacher(Protocol):
    # True when scoring runs off this process's devices (a server): the trainer then calls
    # `score` from a worker thread while its devices generate (collect.Collector).
    remote: bool

    def score(self, input_ids, attention_mask, num_response: int, *, top_k: int = 0) -> TeacherScores:
        ...

    def close(self) -> None:
        ...


def topk_logprobs(hidden: jax.Array, lm_head: jax.Array, k: int, *, chunk_size: int = 512,
                  temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """The k most likely tokens of log softmax(hidden @ lm_head / temperature), never building [B, T, V].

    hidden [B, T, H], lm_head [H, V] -> (ids int32 [B, T, k], logprobs f32 [B, T, k]) sorted by
    descending log-prob. A scan over vocabulary tiles keeps a running logsumexp and a running
    top-k; the last tile is slid back to end at V, its columns already seen masked out.
    """
    v = lm_head.shape[1]
    if not 1 <= k <= v:
        raise ValueError(f"topk_logprobs: k must be in [1, {v}], got {k}")
    width = max(k, min(int(chunk_size), v))
    tiles = -(-v // width)
    b, t, _ = hidden.shape

    def body(carry, i):
        m, s, top_v, top_i = carry
        start = jnp.minimum(i * width, v - width)
        cols = start + jnp.arange(width, dtype=jnp.int32)
        w = jax.lax.dynamic_slice_in_dim(lm_head, start, width, axis=1)
        logits = jnp.einsum("bth,hv->btv", hidden, w, preferred_element_type=jnp.float32) / temperature
        logits = jnp.where(cols >= i * width, logits, -jnp.inf)  # columns of the previous tile
        m_new = jnp.maximum(m, logits.max(-1))
        s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[..., None]).sum(-1)
        cand_v = jnp.concatenate([top_v, logits], -1)
        cand_i = jnp.concatenate([top_i, jnp.broadcast_to(cols, (b, t, width))], -1)
        top_v, pos = jax.lax.top_k(cand_v, k)
        return (m_new, s, top_v, jnp.take_along_axis(cand_i, pos, -1)), None

    init = (jnp.full((b, t), -jnp.inf, jnp.float32), jnp.zeros((b, t), jnp.float32),
            jnp.full((b, t, k), -jnp.inf, jnp.float32), jnp.zeros((b, t, k), jnp.int32))
    (m, s, top_v, top_i), _ = jax.lax.scan(body, init, jnp.arange(tiles, dtype=jnp.int32))
    return top_i, top_v - (m + jnp.log(s))[..., None]


def _response_mask(attention_mask, num_response: int):
    return attention_mask[:, attention_mask.shape[1] - num_response:]


class LocalTeacher:
    """The co-located teacher: a scoring pass (scope_jax.scoring.make_score) of a loaded model.

    model: a scope_jax.models.Transformer (sharded as loaded). temperature: the teacher scores
    log softmax(logits / temperature) (config.teacher_temperature). chunk_size: vocabulary tile.
    score: the trainer's pass (make_score(cfg) under its mesh: micro-batched, packed with
    config.packing); default make_score(chunk_size=chunk_size), one pass of the whole batch.
    """

    # Its passes run on the trainer's devices, so the trainer keeps them on its main thread:
    # programs with collectives dispatched from two threads can start in different orders on
    # different devices (or hosts) and deadlock, and they would share the chips anyway.
    remote = False

    def __init__(self, model, *, temperature: float = 1.0, chunk_size: int = 512, score=None):
        self.graphdef, self.params = nnx.split(model)
        self.temperature = float(temperature)
        chunk, temp = int(chunk_size), self.temperature
        score = scoring.make_score(chunk_size=chunk) if score is None else score

        def logprobs(gd, p, ids, mask, m, packed):
            return jnp.where(_response_mask(mask, m), score(gd, p, ids, mask, m, temp, packed), 0.0)

        def top(gd, p, ids, mask, m, k):
            model = nnx.merge(gd, p)
            start = ids.shape[1] - m
            h = model.hidden(ids, attention_mask=mask)[:, start - 1: start - 1 + m]
            return topk_logprobs(h, model.lm_head_weight(), k, chunk_size=chunk, temperature=temp)

        self._logprobs = logprobs
        # A second forward pass, only when top-k is asked for (no trainer loss reads it yet).
        self._top = jax.jit(top, static_argnums=(0, 4, 5))

    def score(self, input_ids, attention_mask, num_response: int, *, top_k: int = 0,
              packed=None) -> TeacherScores:
        """packed: the step's packing.PackedBatch of these rows (with config.packing), so the
        teacher's pass reads the plan the student's passes and the step share."""
        m = int(num_response)
        lp = self._logprobs(self.graphdef, self.params, input_ids, attention_mask, m, packed)
        if not top_k:
            return TeacherScores(lp)
        ids, lps = self._top(self.graphdef, self.params, input_ids, attention_mask, m, int(top_k))
        return TeacherScores(lp, ids, lps)

    def close(self) -> None:
        pass


# -------------------------------------------------------------------------------- remote


_API_HINT = ("config.teacher_url must be the base of an OpenAI-compatible API that serves the teacher "
             "(e.g. http://host:8000/v1: vLLM, SGLang or python -m tools.serve_teacher)")


def _is_html(r) -> bool:
    return "html" in r.headers.get("content-type", "") or r.text.lstrip()[:1] == "<"


def _body_summary(r) -> str:
    """A response body in one short line: an HTML page by its title, text with whitespace collapsed."""
    if _is_html(r):
        title = re.search(r"<title[^>]*>(.*?)</title>", r.text, re.I | re.S)
        return f"an HTML page{f' titled {title.group(1).strip()[:80]!r}' if title else ''}"
    text = " ".join(r.text.split())
    return repr(text[:300] + ("..." if len(text) > 300 else "")) if text else "an empty body"


def _token_id(key: str, where: str) -> int:
    """'token_id:123' (vLLM's return_tokens_as_token_ids) or '123' (a prompt_logprobs key) -> 123."""
    text = key[len("token_id:"):] if key.startswith("token_id:") else key
    if not text.lstrip("-").isdigit():
        raise TeacherError(f"{where}: top log-prob key {key!r} is not a token id; the server must "
                           "send ids (vLLM: return_tokens_as_token_ids or prompt_logprobs)")
    return int(text)


def _top(entries: dict[int, float], k: int, where: str) -> tuple[list[int], list[float]]:
    if len(entries) < k:
        raise TeacherError(f"{where}: {len(entries)} top log-probs, fewer than top_k={k}")
    best = sorted(entries.items(), key=lambda kv: -kv[1])[:k]
    return [i for i, _ in best], [lp for _, lp in best]


def parse_choice(choice: dict, seq: list[int], start: int, top_k: int, where: str):
    """Log-probs of seq[start:] from one completions choice.

    Returns (logprobs f64 [n], top_ids int [n, top_k], top_logprobs f64 [n, top_k]),
    n = len(seq) - start. Prefers vLLM's `prompt_logprobs` ([None, {"id": {"logprob": ..}}, ..]),
    else the legacy `logprobs` object; checks that the echoed tokens are the ones sent when the
    server names them by id.
    """
    n = len(seq)
    lps, tids, tlps = [], [], []
    prompt_lp = choice.get("prompt_logprobs")
    if prompt_lp is not None:
        if len(prompt_lp) != n:
            raise TeacherError(f"{where}: prompt_logprobs has {len(prompt_lp)} entries for {n} tokens sent")
        for j in range(start, n):
            d = prompt_lp[j] or {}
            entries = {_token_id(str(key), where): float(val["logprob"] if isinstance(val, dict) else val)
                       for key, val in d.items()}
            if seq[j] not in entries:
                raise TeacherError(f"{where}: prompt_logprobs[{j}] lacks the sent token {seq[j]}")
            lps.append(entries[seq[j]])
            if top_k:
                i, v = _top(entries, top_k, f"{where} position {j}")
                tids.append(i)
                tlps.append(v)
    else:
        obj = choice.get("logprobs")
        if not isinstance(obj, dict) or not isinstance(obj.get("token_logprobs"), list):
            raise TeacherError(f"{where}: the choice has neither prompt_logprobs nor logprobs.token_logprobs")
        tl = obj["token_logprobs"]
        if not n <= len(tl) <= n + 1:
            raise TeacherError(f"{where}: echoed {len(tl)} token log-probs for {n} tokens sent "
                               "(the server must echo the prompt: echo=True)")
        tokens = obj.get("tokens") or []
        for j, tok in enumerate(tokens[:n]):
            if isinstance(tok, str) and tok.startswith("token_id:") and int(tok[9:]) != seq[j]:
                raise TeacherError(f"{where}: echoed token {j} is {tok}, sent {seq[j]} (re-tokenised?)")
        top = obj.get("top_logprobs") or []
        for j in range(start, n):
            if tl[j] is None:
                raise TeacherError(f"{where}: token_logprobs[{j}] is null")
            lps.append(float(tl[j]))
            if top_k:
                if j >= len(top) or not top[j]:
                    raise TeacherError(f"{where}: top_logprobs[{j}] is missing")
                entries = {_token_id(key, where): float(val) for key, val in top[j].items()}
                i, v = _top(entries, top_k, f"{where} position {j}")
                tids.append(i)
                tlps.append(v)
    shape = (n - start, top_k)
    return (np.asarray(lps, np.float64), np.asarray(tids, np.int64).reshape(shape),
            np.asarray(tlps, np.float64).reshape(shape))


class RemoteTeacher:
    """A client of an OpenAI-compatible completions server (vLLM, SGLang, tools.serve_teacher).

    url: the API base, e.g. http://host:8000/v1 (POST {url}/completions, GET {url}/models).
    model: the served model name; "" asks GET {url}/models and takes its only model.
    batch_size: sequences per request. max_concurrency: requests in flight at once.
    timeout_s: per request. retries: further attempts after a connection error, a timeout, a
    408 / 429 or a 5xx, waiting backoff_s * 2**attempt (capped at 60 s) before each; any other
    4xx fails at once. mesh: needed in a multi-process run (rows are split over its batch axes).
    Errors are TeacherError naming the server, the request (rows, sequences, tokens) and cause.
    `score` may be called from any thread (httpx.Client is thread-safe).
    """

    remote = True

    def __init__(self, url: str, *, model: str = "", batch_size: int = 16, max_concurrency: int = 4,
                 timeout_s: float = 300.0, retries: int = 5, backoff_s: float = 1.0, mesh=None):
        import httpx

        if not url.startswith(("http://", "https://")):
            raise ValueError(f"teacher_url {url!r} must start with http:// or https:// (e.g. http://host:8000/v1)")
        if batch_size < 1 or max_concurrency < 1 or retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError(f"RemoteTeacher: bad settings batch_size={batch_size} max_concurrency="
                             f"{max_concurrency} retries={retries} timeout_s={timeout_s} backoff_s={backoff_s}")
        self.url = url.rstrip("/")
        self.batch_size, self.retries, self.backoff_s = int(batch_size), int(retries), float(backoff_s)
        self.mesh = mesh
        self._httpx = httpx
        self._client = httpx.Client(timeout=timeout_s,
                                    limits=httpx.Limits(max_connections=max_concurrency))
        self._pool = concurrent.futures.ThreadPoolExecutor(max_concurrency, thread_name_prefix="teacher")
        self.model = model or self._served_model()

    def _request(self, method: str, path: str, what: str, body: dict | None = None, *, base: str | None = None,
                 missing_ok: bool = False) -> dict | None:
        """One call with retries; returns the decoded JSON body (None for a 404 when `missing_ok`).
        base: the URL `path` is appended to (default: the API base, config.teacher_url)."""
        base = self.url if base is None else base
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(60.0, self.backoff_s * 2 ** (attempt - 1))
                log.warning("teacher server %s: %s: attempt %d failed (%s); retrying in %.1fs",
                            self.url, what, attempt, last, delay)
                time.sleep(delay)
            try:
                r = self._client.request(method, base + path, json=body)
            except self._httpx.HTTPError as e:  # connection refused / reset, timeouts
                last = f"{type(e).__name__}: {e}"
                continue
            if r.status_code == 404 and missing_ok:
                return None
            if r.status_code == 200:
                try:
                    out = r.json()
                except ValueError:
                    out = None
                if isinstance(out, dict):
                    return out
                raise TeacherError(f"teacher server {self.url}: {method} {base + path} {what}: the answer is not "
                                   f"a JSON object but {_body_summary(r)}; {_API_HINT}")
            last = f"HTTP {r.status_code}: {_body_summary(r)}"
            if r.status_code < 500 and r.status_code not in (408, 429):
                hint = f"; {_API_HINT}" if _is_html(r) or r.status_code == 404 else ""
                raise TeacherError(f"teacher server {self.url}: {method} {path} {what} was refused: {last}{hint}")
        raise TeacherError(f"teacher server {self.url}: {method} {path} {what} failed after "
                           f"{self.retries + 1} attempts; last error: {last}")

    def _served_model(self) -> str:
        names = [m.get("id") for m in self._request("GET", "/models", "(model list)").get("data", [])]
        if len(names) != 1:
            raise TeacherError(f"teacher server {self.url} serves models {names}; set "
                               "config.teacher_client.model to one of them")
        return names[0]

    def served_info(self) -> dict:
        """The /v1/models entry of the served model (id, max_model_len, and what else the server
        reports, e.g. tools.serve_teacher's vocab_size)."""
        for m in self._request("GET", "/models", "(model list)").get("data", []):
            if isinstance(m, dict) and m.get("id") == self.model:
                return m
        raise TeacherError(f"teacher server {self.url}: GET /models does not list the model {self.model!r}")

    def tokenize(self, text: str) -> list[int] | None:
        """The server's token ids of `text` (vLLM's POST /tokenize at the server's root, no special
        tokens added), or None when the server has no such endpoint."""
        root = self.url[:-len("/v1")] if self.url.endswith("/v1") else self.url
        out = self._request("POST", "/tokenize", "(tokenize)", {"model": self.model, "prompt": text,
                                                                 "add_special_tokens": False},
                            base=root, missing_ok=True)
        if out is None:
            return None
        if not isinstance(out.get("tokens"), list):
            raise TeacherError(f"teacher server {self.url}: POST {root}/tokenize answered without a 'tokens' list")
        return [int(t) for t in out["tokens"]]

    def score_ids(self, seq: list[int]):
        """Log-probs f64 [len(seq) - 1] of seq[1:] given the tokens before (one request), with
        (empty) top-k arrays, as parse_choice returns them."""
        return self._score_chunk([0], [list(seq)], [1], 0)[0]

    def _score_chunk(self, rows: list[int], seqs: list[list[int]], starts: list[int], top_k: int):
        what = (f"(rows {rows[0]}..{rows[-1]}: {len(seqs)} sequences, "
                f"{sum(map(len, seqs))} tokens)")
        body = {"model": self.model, "prompt": seqs, "max_tokens": 1, "echo": True,
                "logprobs": max(1, top_k), "temperature": 1.0, "return_tokens_as_token_ids": True}
        out = self._request("POST", "/completions", what, body)
        choices = out.get("choices")
        if not isinstance(choices, list) or len(choices) != len(seqs):
            raise TeacherError(f"teacher server {self.url}: {what}: expected {len(seqs)} choices, got "
                               f"{len(choices) if isinstance(choices, list) else type(choices).__name__}")
        choices = sorted(choices, key=lambda c: c.get("index", 0))
        return [parse_choice(c, s, st, top_k, f"teacher server {self.url}: row {r}")
                for r, c, s, st in zip(rows, choices, seqs, starts)]

    def score(self, input_ids, attention_mask, num_response: int, *, top_k: int = 0) -> TeacherScores:
        local = self.score_local(shd.local_rows(input_ids), shd.local_rows(attention_mask),
                                 num_response, top_k=top_k)
        return TeacherScores(*(self._global(x) for x in local))

    def score_local(self, ids: np.ndarray, mask: np.ndarray, num_response: int, *,
                    top_k: int = 0) -> tuple[np.ndarray, ...]:
        """`score` of this process's rows, as numpy, without assembling the global batch: ids,
        mask [b, t] (the response in the last num_response columns) -> (log-probs float32 [b,
        num_response],) or, with top_k, (+ ids int32 and log-probs float32 [b, num_response,
        top_k]). The Collector streams finished rows through it while generation goes on."""
        ids, mask = np.asarray(ids), np.asarray(mask).astype(bool)
        b, t = ids.shape
        m = int(num_response)
        p = t - m
        lp = np.zeros((b, m), np.float32)
        tid = np.zeros((b, m, top_k), np.int32)
        tlp = np.zeros((b, m, top_k), np.float32)
        rows = [i for i in range(b) if mask[i, p:].any()]  # a row without a response has nothing to score
        seqs = [ids[i][mask[i]].tolist() for i in rows]
        starts = [int(mask[i, :p].sum()) for i in rows]
        for i, st in zip(rows, starts):
            if st == 0:
                raise ValueError(f"RemoteTeacher.score: row {i} has no prompt token; the first token has no log-prob")
        jobs = [self._pool.submit(self._score_chunk, rows[k:k + self.batch_size], seqs[k:k + self.batch_size],
                                  starts[k:k + self.batch_size], top_k)
                for k in range(0, len(rows), self.batch_size)]
        try:
            results = [r for job in jobs for r in job.result()]
        finally:
            for job in jobs:
                job.cancel()
        for i, (l, ti, tv) in zip(rows, results):
            n = len(l)  # the response is contiguous from column p
            lp[i, :n], tid[i, :n], tlp[i, :n] = l, ti, tv
        return (lp,) if not top_k else (lp, tid, tlp)

    def _global(self, x: np.ndarray) -> jax.Array:
        return jnp.asarray(shd.to_global(x, self.mesh))  # this host's rows -> the global batch

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()


def from_config(cfg, model=None, mesh=None) -> Teacher:
    """The teacher config asks for: RemoteTeacher(config.teacher_url) or LocalTeacher(model).

    Raises ValueError naming the config key when a remote teacher is asked to do what it
    cannot (score at a temperature other than 1, sample for KD).
    """
    url = cfg.get("teacher_url") or ""
    if not url:
        if model is None:
            raise ValueError("config.teacher_url is empty, so the teacher must be loaded (config.teacher)")
        score = scoring.make_score(cfg)
        return LocalTeacher(model, temperature=float(cfg.teacher_temperature), chunk_size=int(cfg.model.logprob_chunk),
                            score=score if mesh is None else shd.under_mesh(score, mesh))
    check_remote_config(cfg)
    c = cfg.teacher_client
    return RemoteTeacher(url, model=c.model, batch_size=c.batch_size, max_concurrency=c.max_concurrency,
                         timeout_s=c.timeout_s, retries=c.retries, backoff_s=c.backoff_s, mesh=mesh)


def check_remote_config(cfg) -> None:
    """Raises ValueError when config.teacher_url is set with settings a remote teacher cannot serve."""
    if not math.isclose(float(cfg.teacher_temperature), 1.0):
        raise ValueError(f"config.teacher_temperature={cfg.teacher_temperature}: a remote teacher "
                         f"(config.teacher_url={cfg.teacher_url!r}) scores at temperature 1 only")
    if algorithms.get(cfg.algo).samples_with == "teacher":
        raise ValueError(f"config.algo={cfg.algo!r} samples from the teacher, which config.teacher_url="
                         f"{cfg.teacher_url!r} does not do; load it with config.teacher instead")
