"""A teacher-scoring server: a Hugging Face checkpoint on this project's JAX model, behind the
subset of the OpenAI completions API that scoring needs (what vLLM and SGLang serve).

    python -m tools.serve_teacher --model DIR --host 0.0.0.0 --port 8000 [--mesh fsdp=4,tensor=2]

Endpoints:
  POST /v1/completions  prompt: a list of token ids or a list of such lists (text is refused:
                        ids are never re-tokenised); max_tokens 0 or 1; echo; logprobs k in
                        [0, 20]; return_tokens_as_token_ids (vLLM's extra). The answer is
                        OpenAI's legacy format: with echo, choices[i].logprobs.token_logprobs holds
                        the log-prob of every prompt token (the first null), `tokens` and
                        `top_logprobs` (the k most likely tokens, plus the actual one) per
                        position; max_tokens=1 appends one greedy token. `model` may be omitted.
  GET /v1/models        the served model (its max_model_len, and vocab_size: its embedding rows).
  POST /tokenize        vLLM's: {"prompt": text, "add_special_tokens"} -> {"tokens": ids, "count",
                        "max_model_len"}; 404 when the server has no tokenizer. Trainers compare it
                        with the student's tokenizer (scope_jax.compat.check_served).
  GET /health           200 once the model is loaded.

Log-probs are of the raw model (temperature 1); `temperature`, `top_p` and friends are
accepted and ignored, and the one generated token is the argmax. Tokens are named
"token_id:N" unless a tokenizer was given (and return_tokens_as_token_ids is not set).

Concurrent requests are gathered (for max_wait_s) into one queue and scored in jitted forward
passes whose shapes come from a few buckets: rows and length are powers of two (rows a multiple
of the mesh's batch shards, length at least 16) with rows * length <= max_batch_tokens, so a
server compiles a handful of programs however requests arrive. Parameters are sharded over the
local devices (scope_jax.sharding rules); rows are split over the mesh's data-parallel axes.
Malformed requests get a 4xx with an OpenAI-style {"error": {...}} body; SIGTERM drains the
requests in flight and exits (uvicorn).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from scope_jax import checkpoint, losses
from scope_jax.compat import has_tokenizer
from scope_jax import sharding as shd
from scope_jax.models import dtype_named, load_hf
from scope_jax.teacher import topk_logprobs

log = logging.getLogger(__name__)

MAX_LOGPROBS = 20  # as vLLM's default max_logprobs
_FLOOR = -9999.0  # JSON has no -inf; OpenAI and vLLM report -9999 for "impossible"


class BadRequest(Exception):
    """A request the server refuses: HTTP status, OpenAI error type and the offending field."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 kind: str = "BadRequestError"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def response(self):
        from starlette.responses import JSONResponse

        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.status}}, status_code=self.status)


@dataclasses.dataclass(frozen=True)
class Completion:
    """A parsed POST /v1/completions body."""

    prompts: list[list[int]]
    max_tokens: int
    echo: bool
    logprobs: int | None
    token_ids_as_text: bool


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_completion(body, *, vocab_size: int, max_model_len: int, model_names: Sequence[str]) -> Completion:
    """Validates a completions request; raises BadRequest naming the field."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is not None and model not in model_names:
        raise BadRequest(f"The model `{model}` does not exist; this server serves {model_names[0]!r}.",
                         param="model", status=404, kind="NotFoundError")
    for key, ok in (("stream", lambda v: not v), ("n", lambda v: v == 1), ("best_of", lambda v: v in (None, 1)),
                    ("suffix", lambda v: v is None), ("use_beam_search", lambda v: not v)):
        if key in body and not ok(body[key]):
            raise BadRequest(f"{key}={body[key]!r} is not supported by this scoring server", param=key)
    prompt = body.get("prompt")
    if prompt is None:
        raise BadRequest("prompt is required: a list of token ids or a list of such lists", param="prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)):
        raise BadRequest("this server scores token ids: send prompt as a list of ints or a list of lists "
                         "of ints, not text", param="prompt")
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        prompts = prompt
    else:
        raise BadRequest("prompt must be a non-empty list of token ids or a non-empty list of such lists",
                         param="prompt")
    max_tokens = body.get("max_tokens", 16)
    if not _is_int(max_tokens) or max_tokens not in (0, 1):
        raise BadRequest(f"max_tokens must be 0 or 1 on this scoring server, got {max_tokens!r}",
                         param="max_tokens")
    for i, p in enumerate(prompts):
        if not p or not all(_is_int(t) for t in p):
            raise BadRequest(f"prompt[{i}] must be a non-empty list of ints", param="prompt")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise BadRequest(f"prompt[{i}] has token id {bad[0]} outside [0, {vocab_size})", param="prompt")
        if len(p) + max_tokens > max_model_len:
            raise BadRequest(f"prompt[{i}] has {len(p)} tokens; with max_tokens={max_tokens} that exceeds "
                             f"max_model_len={max_model_len}", param="prompt")
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise BadRequest(f"echo must be true or false, got {echo!r}", param="echo")
    logprobs = body.get("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS):
        raise BadRequest(f"logprobs must be an int in [0, {MAX_LOGPROBS}] or null, got {logprobs!r}",
                         param="logprobs")
    as_ids = body.get("return_tokens_as_token_ids")
    if as_ids is not None and not isinstance(as_ids, bool):
        raise BadRequest(f"return_tokens_as_token_ids must be a boolean, got {as_ids!r}",
                         param="return_tokens_as_token_ids")
    return Completion(prompts=prompts, max_tokens=max_tokens, echo=echo, logprobs=logprobs,
                      token_ids_as_text=bool(as_ids))


# -------------------------------------------------------------------------------- forward


def _forward(graphdef, state, ids, mask, *, k: int, chunk: int):
    """ids int32 [B, L] right-padded, mask bool [B, L] -> (log p(ids[:, t + 1]) f32 [B, L - 1],
    top-k ids int32 [B, L, k] and log-probs f32 [B, L, k] of the next token at every position)."""
    model = nnx.merge(graphdef, state)
    hidden = model.hidden(ids, attention_mask=mask)
    w = model.lm_head_weight()
    lp = losses.token_logprobs(hidden[:, :-1], w, ids[:, 1:], chunk_size=chunk)
    top_ids, top_lp = topk_logprobs(hidden, w, k, chunk_size=chunk)
    return lp, top_ids, top_lp


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class Scorer:
    """Scores token sequences with bucketed, jitted forward passes on `mesh`.

    Call with (seqs, k): a list of (logprobs f32 [n - 1], top_ids int32 [n, K], top_logprobs
    f32 [n, K]) per sequence of n tokens, K = the power of two >= max(k, 1).
    """

    def __init__(self, model, mesh, *, max_batch_tokens: int = 16384, chunk_size: int = 512,
                 min_length: int = 16):
        self.graphdef, self.state = nnx.split(model)
        self.vocab = int(model.config.vocab_size)
        self.mesh = mesh
        self.row_shards = shd.batch_shards(mesh)
        self.rows_sharding = shd.batch_sharding(mesh)
        self.max_batch_tokens, self.min_length = int(max_batch_tokens), int(min_length)
        self._forward = jax.jit(functools.partial(_forward, chunk=int(chunk_size)),
                                static_argnames=("graphdef", "k"))
        self.shapes: set[tuple[int, int, int]] = set()  # (rows, length, K) compiled so far

    def bucket(self, rows: int, longest: int) -> tuple[int, int]:
        """(rows, length) of the forward pass for `rows` sequences of at most `longest` tokens."""
        r = _pow2(rows)
        return -(-r // self.row_shards) * self.row_shards, max(self.min_length, _pow2(longest))

    def plan(self, lengths: Sequence[int]) -> list[list[int]]:
        """Groups sequence indices into forward passes of at most max_batch_tokens (one long
        sequence always gets its own pass); sorted by length so rows of a pass are alike."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        groups, cur = [], []
        for i in order:
            rows, length = self.bucket(len(cur) + 1, lengths[i])
            if cur and rows * length > self.max_batch_tokens:
                groups.append(cur)
                cur = []
            cur.append(i)
        return groups + [cur] if cur else groups

    def __call__(self, seqs: list[list[int]], k: int):
        kk = min(_pow2(max(1, k)), self.vocab)
        out = [None] * len(seqs)
        for group in self.plan([len(s) for s in seqs]):
            rows, length = self.bucket(len(group), max(len(seqs[i]) for i in group))
            ids = np.zeros((rows, length), np.int32)
            mask = np.zeros((rows, length), bool)
            mask[:, 0] = True  # filler rows hold one token, so no row attends to nothing
            for r, i in enumerate(group):
                ids[r, :len(seqs[i])] = seqs[i]
                mask[r, :len(seqs[i])] = True
            self.shapes.add((rows, length, kk))
            with jax.set_mesh(self.mesh):
                lp, ti, tl = self._forward(self.graphdef, self.state, jax.device_put(ids, self.rows_sharding),
                                           jax.device_put(mask, self.rows_sharding), k=kk)
            lp, ti, tl = np.asarray(lp), np.asarray(ti), np.asarray(tl)
            for r, i in enumerate(group):
                n = len(seqs[i])
                out[i] = (lp[r, :n - 1], ti[r, :n], tl[r, :n])
        return out


# -------------------------------------------------------------------------------- batching


class Batcher:
    """Gathers the sequences of concurrent requests and scores them together on one worker thread."""

    def __init__(self, scorer: Scorer, max_wait_s: float = 0.005):
        self.scorer, self.max_wait_s = scorer, float(max_wait_s)
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="forward")
        self.queue: asyncio.Queue | None = None

    async def score(self, seqs: list[list[int]], k: int):
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((seqs, k, fut))
        return await fut

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            await asyncio.sleep(self.max_wait_s)  # let requests that arrive together share a pass
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            seqs = [s for it in items for s in it[0]]
            try:
                scores = await loop.run_in_executor(self.executor, self.scorer, seqs, max(it[1] for it in items))
            except Exception as e:  # noqa: BLE001 - fail these requests (500), keep serving
                log.exception("forward pass over %d sequences failed", len(seqs))
                for _, _, fut in items:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            at = 0
            for s, _, fut in items:
                if not fut.done():  # the client may have gone
                    fut.set_result(scores[at:at + len(s)])
                at += len(s)


# -------------------------------------------------------------------------------- the app


def _f(x) -> float:
    return max(float(x), _FLOOR)


def render_choice(index: int, seq: list[int], scores, req: Completion, token_str, decode) -> dict:
    """One OpenAI legacy completions choice from (logprobs [n-1], top ids / log-probs [n, K])."""
    lp, top_ids, top_lp = scores
    n, k = len(seq), req.logprobs or 0

    def top(pos: int, actual: int, actual_lp: float) -> dict:
        d = {token_str(int(i)): _f(v) for i, v in zip(top_ids[pos, :k], top_lp[pos, :k])}
        d.setdefault(token_str(actual), _f(actual_lp))
        return d

    ids, lps, tops = [], [], []
    if req.echo:
        ids = list(seq)
        lps = [None] + [_f(v) for v in lp]
        tops = [None] + [top(j - 1, seq[j], lp[j - 1]) for j in range(1, n)]
    if req.max_tokens == 1:
        nxt = int(top_ids[n - 1, 0])
        ids.append(nxt)
        lps.append(_f(top_lp[n - 1, 0]))
        tops.append(top(n - 1, nxt, top_lp[n - 1, 0]))
    tokens = [token_str(i) for i in ids]
    logprobs = None
    if req.logprobs is not None:
        offsets = np.cumsum([0] + [len(t) for t in tokens[:-1]]).tolist() if tokens else []
        logprobs = {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
    return {"index": index, "text": decode(ids), "logprobs": logprobs, "finish_reason": "length"}


def make_app(scorer: Scorer, *, model_name: str, aliases: Sequence[str] = (), max_model_len: int,
             tokenizer=None, max_wait_s: float = 0.005):
    """The Starlette app: POST /v1/completions, GET /v1/models, GET /health."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    batcher = Batcher(scorer, max_wait_s)
    names = [model_name, *[a for a in aliases if a != model_name]]
    created = int(time.time())

    def token_str(i: int, as_ids: bool) -> str:
        return f"token_id:{i}" if as_ids or tokenizer is None else tokenizer.decode([i])

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids) if tokenizer is not None else ""

    async def completions(request):
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            return BadRequest(f"the request body is not valid JSON: {e}").response()
        try:
            req = parse_completion(body, vocab_size=scorer.vocab, max_model_len=max_model_len, model_names=names)
        except BadRequest as e:
            return e.response()
        scores = await batcher.score(req.prompts, req.logprobs or 0)
        ts = functools.partial(token_str, as_ids=req.token_ids_as_text)
        choices = [render_choice(i, p, s, req, ts, decode) for i, (p, s) in enumerate(zip(req.prompts, scores))]
        prompt_tokens = sum(map(len, req.prompts))
        completion_tokens = req.max_tokens * len(req.prompts)
        return JSONResponse({
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}})

    async def models(request):
        return JSONResponse({"object": "list", "data": [{
            "id": model_name, "object": "model", "created": created, "owned_by": "scope_jax",
            "max_model_len": max_model_len, "vocab_size": scorer.vocab}]})

    async def tokenize(request):
        if tokenizer is None:
            return BadRequest("this server was started without a tokenizer (--tokenizer)", status=404,
                              kind="NotFoundError").response()
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            return BadRequest(f"the request body is not valid JSON: {e}").response()
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            return BadRequest("prompt must be a string (the text to tokenize)", param="prompt").response()
        model = body.get("model")
        if model is not None and model not in names:
            return BadRequest(f"The model `{model}` does not exist; this server serves {names[0]!r}.",
                              param="model", status=404, kind="NotFoundError").response()
        ids = tokenizer.encode(body["prompt"], add_special_tokens=bool(body.get("add_special_tokens", True)))
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": max_model_len})

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def http_error(request, exc: HTTPException):
        return BadRequest(f"{request.method} {request.url.path}: {exc.detail}", status=exc.status_code,
                          kind="NotFoundError" if exc.status_code == 404 else "BadRequestError").response()

    async def server_error(request, exc: Exception):
        return JSONResponse({"error": {"message": f"{type(exc).__name__}: {exc}", "type": "InternalServerError",
                                       "param": None, "code": 500}}, status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.queue = asyncio.Queue()
        task = asyncio.create_task(batcher.run())
        try:
            yield
        finally:
            task.cancel()
            batcher.executor.shutdown(wait=True)

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                             Route("/v1/models", models, methods=["GET"]),
                             Route("/tokenize", tokenize, methods=["POST"]),
                             Route("/health", health, methods=["GET"])],
                     exception_handlers={HTTPException: http_error, Exception: server_error},
                     lifespan=lifespan)


def serve(model_dir: str, *, host: str = "127.0.0.1", port: int = 8000, dtype: str = "float32",
          mesh: str = "", served_model_name: str = "", tokenizer: str = "", max_batch_tokens: int = 16384,
          max_model_len: int = 0, chunk_size: int = 512, max_wait_s: float = 0.005) -> None:
    """Loads `model_dir` and serves it until SIGTERM / SIGINT (arguments: tools/serve_teacher.py)."""
    import uvicorn

    m = shd.mesh_from_flag(mesh) or shd.make_mesh({"fsdp": -1}, devices=jax.local_devices())
    dt = dtype_named(dtype)
    t0 = time.perf_counter()
    model = load_hf(model_dir, dtype=dt, mesh=m)
    # a NaN teacher would answer every request with NaN log-probs
    checkpoint.check_finite(nnx.state(model), f"{model_dir}: the teacher's parameter")
    max_len = int(max_model_len or model.config.max_position_embeddings)
    tok_dir = tokenizer or (model_dir if has_tokenizer(model_dir) else "")
    tok = None
    if tok_dir:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tok_dir)
    name = served_model_name or model_dir
    log.info("loaded %s (%s, mesh %s) in %.1fs; serving %r on http://%s:%d/v1 (tokenizer: %s)", model_dir, dtype,
             dict(m.shape), time.perf_counter() - t0, name, host, port, tok_dir or "none")
    aliases = [model_dir, os.path.abspath(model_dir), os.path.basename(os.path.normpath(model_dir))]
    app = make_app(Scorer(model, m, max_batch_tokens=max_batch_tokens, chunk_size=chunk_size), model_name=name,
                   aliases=aliases, max_model_len=max_len, tokenizer=tok, max_wait_s=max_wait_s)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info")).run()
