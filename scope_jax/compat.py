"""Same tokenizer, same teacher: what a distillation run checks before it trains.

Tokenizers. The student learns from the teacher's log-probs of the student's token ids, so both
must map text to the same ids: cross-tokenizer distillation is not supported (TRL, AReaL and
NeMo-RL trackers: a mismatch trains silently on wrong targets). `tokenizer_differences`
compares two loaded tokenizers: the vocabulary (token -> id, added tokens included), the model
type and merges, the special tokens, and EOS / pad; when those agree, the ids of `probe_text`
(normalizer and pre-tokenizer: transformers may rebuild them from the model type, so the same
tokenizer.json loads with another pre-tokenizer JSON that splits text the same way). The model's
embedding matrix may be larger than the tokenizer (Qwen2 1.5B pads to 151,936 rows, 7B to
152,064): that is the same tokenizer; a teacher with fewer rows than the student's tokenizer has
ids is not. A served teacher is checked through its /tokenize endpoint (vLLM's, and
tools.serve_teacher's): it must tokenize `probe_text` to the student's ids.

Teacher identity. A teacher on a server (config.teacher_url) has no files here; it is
fingerprinted by what it serves: /v1/models' id and max_model_len, and the log-probs it returns
for a fixed probe sequence (`served_fingerprint`), compared on resume to PROBE_ATOL
(`served_changes`). A co-located teacher's fingerprint is its checkpoint's (scope_jax.checkpoint).
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from scope_jax import algorithms
from scope_jax.teacher import RemoteTeacher

log = logging.getLogger(__name__)

PROBE_TEXT = ("Let x = 12 and y = 30. Then x + y = 42, and 7 * 6 = 42 as well. "
              "The answer is \\boxed{42}.\nQ: Is 0.5 < 1/3? A: No; 1/3 = 0.333..., so 0.5 > 1/3.")
PROBE_ATOL = 1e-3  # served log-probs of the probe that still count as the same teacher
_SPREAD = 512  # vocabulary entries a served tokenizer is probed with, evenly spaced


class TokenizerMismatch(ValueError):
    """Student and teacher tokenizers map text to different ids; the message says where."""


def _backend(tok) -> dict:
    """The tokenizers-library JSON of a fast tokenizer ({} for one without a backend)."""
    backend = getattr(tok, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else {}


def _first(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def tokenizer_differences(student, teacher) -> list[str]:
    """What differs between two transformers tokenizers in how they map text to ids, one line
    each (empty: the same mapping). Reads vocabularies and the backend JSON, and tokenizes
    probe_text(student) with both when those agree."""
    out = []
    va, vb = student.get_vocab(), teacher.get_vocab()
    if va != vb:
        ia, ib = {i: t for t, i in va.items()}, {i: t for t, i in vb.items()}
        differ = sorted(i for i in set(ia) | set(ib) if ia.get(i) != ib.get(i))
        shown = ", ".join(f"id {i}: {ia.get(i, '<none>')!r} vs {ib.get(i, '<none>')!r}" for i in differ[:3])
        out.append(f"vocabulary: {len(va)} vs {len(vb)} tokens; {len(differ)} ids map to other tokens ({shown})")
    ja, jb = _backend(student), _backend(teacher)
    ma, mb = ja.get("model", {}), jb.get("model", {})
    if ma.get("type") != mb.get("type"):
        out.append(f"model type: {ma.get('type')} vs {mb.get('type')}")
    elif ma.get("merges") != mb.get("merges"):
        a, b = ma.get("merges") or [], mb.get("merges") or []
        i = _first(a, b)
        out.append(f"merges: {len(a)} vs {len(b)}, first difference at merge {i}: "
                   f"{a[i] if i < len(a) else '<none>'!r} vs {b[i] if i < len(b) else '<none>'!r}")
    aa, ab = student.get_added_vocab(), teacher.get_added_vocab()
    if aa != ab:
        differ = sorted(set(aa.items()) ^ set(ab.items()), key=lambda kv: kv[1])
        out.append(f"added tokens: {len(aa)} vs {len(ab)}, e.g. {differ[0][0]!r} (id {differ[0][1]}) in one only")
    sa, sb = set(student.all_special_tokens), set(teacher.all_special_tokens)
    if sa != sb:
        out.append(f"special tokens: {sorted(sa - sb)} only in the student's, {sorted(sb - sa)} only in the teacher's")
    for what in ("eos", "pad"):
        a, b = getattr(student, f"{what}_token_id"), getattr(teacher, f"{what}_token_id")
        if a != b:
            out.append(f"{what.upper()}: id {a} ({getattr(student, f'{what}_token')!r}) vs id {b} "
                       f"({getattr(teacher, f'{what}_token')!r})")
    if not out:  # the same tables; normalizer and pre-tokenizer may still split text otherwise
        text = probe_text(student)
        a, b = student.encode(text, add_special_tokens=False), teacher.encode(text, add_special_tokens=False)
        if a != b:
            i = _first(a, b)
            out.append(f"the probe text (scope_jax.compat.probe_text) is {len(a)} vs {len(b)} ids, first difference "
                       f"at position {i}: id {a[i] if i < len(a) else None} vs id {b[i] if i < len(b) else None} "
                       "(normalizer or pre-tokenizer)")
    return out


def _refuse(student_src: str, teacher_src: str, lines: list[str]) -> TokenizerMismatch:
    return TokenizerMismatch(
        f"tokenizer mismatch: the student's ({student_src}) and the teacher's ({teacher_src}) map text to "
        f"different ids: {'; '.join(lines)}. Cross-tokenizer distillation is not supported: the teacher "
        "must use the student's tokenizer")


def has_tokenizer(path: str) -> bool:
    """Whether checkpoint directory `path` ships tokenizer files."""
    return any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                                "tokenizer.model", "vocab.json"))


def _vocab_rows(path: str) -> int | None:
    """vocab_size of a checkpoint's config.json (its embedding rows), or None."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    return cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))


def check_local(student_tok, student_src: str, teacher_dir: str) -> None:
    """Raises TokenizerMismatch unless the checkpoint `teacher_dir` maps text to the student
    tokenizer's ids and its embedding has a row for each of them. A teacher directory without
    tokenizer files is checked for its embedding rows only (logged)."""
    rows = _vocab_rows(teacher_dir)
    if rows is not None and rows < len(student_tok):
        raise _refuse(student_src, teacher_dir, [
            f"the teacher's embedding has {rows} rows (config.json vocab_size), fewer than the student "
            f"tokenizer's {len(student_tok)} ids: ids {rows}..{len(student_tok) - 1} have no teacher log-prob"])
    if not has_tokenizer(teacher_dir):
        log.warning("teacher %s has no tokenizer files: only its vocabulary size (%s rows >= %d ids) was "
                    "checked against the student's tokenizer %s", teacher_dir, rows, len(student_tok), student_src)
        return
    from transformers import AutoTokenizer

    lines = tokenizer_differences(student_tok, AutoTokenizer.from_pretrained(teacher_dir))
    if lines:
        raise _refuse(student_src, teacher_dir, lines)


def probe_text(tok) -> str:
    """A text that tells tokenizers apart: PROBE_TEXT, the special tokens, and _SPREAD
    vocabulary entries spread over the id range, each decoded."""
    ids = range(0, len(tok), max(1, len(tok) // _SPREAD))
    return " ".join([PROBE_TEXT, *tok.all_special_tokens, *(tok.decode([i]) for i in ids)])


def check_served(student_tok, student_src: str, teacher) -> None:
    """Raises TokenizerMismatch unless the server behind `teacher` (a scope_jax.teacher.RemoteTeacher)
    tokenizes probe_text(student_tok) to the student's ids, and (when /v1/models reports it) its
    vocabulary covers them. A server without /tokenize is logged, not checked."""
    where = f"teacher server {teacher.url} ({teacher.model!r})"
    rows = teacher.served_info().get("vocab_size")
    if isinstance(rows, int) and rows < len(student_tok):
        raise _refuse(student_src, where, [f"the served model has {rows} vocabulary rows, fewer than the student "
                                           f"tokenizer's {len(student_tok)} ids"])
    text = probe_text(student_tok)
    theirs = teacher.tokenize(text)
    if theirs is None:
        log.warning("%s has no /tokenize endpoint: its tokenizer was not compared with the student's (%s); "
                    "it must be the same tokenizer", where, student_src)
        return
    ours = student_tok.encode(text, add_special_tokens=False)
    if ours != theirs:
        i = _first(ours, theirs)
        a, b = ours[i] if i < len(ours) else None, theirs[i] if i < len(theirs) else None
        raise _refuse(student_src, where, [
            f"the probe text is {len(ours)} ids for the student, {len(theirs)} for the server; first difference at "
            f"position {i}: student id {a} ({student_tok.decode([a]) if a is not None else '<end>'!r}) vs server "
            f"id {b}"])


def check_tokenizers(cfg, student_tok=None) -> None:
    """The run's check, before any training: the student's tokenizer (config.tokenizer, else the
    student's directory) against the teacher the algorithm scores with, co-located or served.
    Raises TokenizerMismatch; nothing when the algorithm uses no teacher."""
    if not algorithms.get(cfg.algo).loads_teacher:
        return
    src = cfg.tokenizer or cfg.student
    if student_tok is None:
        from transformers import AutoTokenizer

        student_tok = AutoTokenizer.from_pretrained(src)
    if algorithms.loads_local_teacher(cfg):
        check_local(student_tok, src, cfg.teacher)
        return
    teacher = _client(cfg)
    try:
        check_served(student_tok, src, teacher)
    finally:
        teacher.close()


# ------------------------------------------------------------------------------ served teacher


def _client(cfg):
    c = cfg.teacher_client
    return RemoteTeacher(cfg.teacher_url, model=c.model, batch_size=1, max_concurrency=1, timeout_s=c.timeout_s,
                         retries=c.retries, backoff_s=c.backoff_s)


def probe_ids(cfg) -> list[int]:
    """The probe sequence: PROBE_TEXT in the student's tokenizer (at least 2 ids)."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.student).encode(PROBE_TEXT, add_special_tokens=False)
    return ids[:64] if len(ids) >= 2 else [0, 1]


def served_fingerprint(cfg, known_ids: list[int] | None = None) -> dict:
    """{"served": True, "url", "model", "max_model_len", "probe_ids", "probe_logprobs"} of the
    teacher at config.teacher_url; probes with `known_ids` (a stored fingerprint's) when given,
    so a resume compares like with like. Raises scope_jax.teacher.TeacherError when the server
    does not answer as an OpenAI-compatible API."""
    teacher = _client(cfg)
    try:
        info = teacher.served_info()
        ids = [int(i) for i in known_ids] if known_ids else probe_ids(cfg)
        lp, _, _ = teacher.score_ids(ids)
    finally:
        teacher.close()
    return {"served": True, "url": teacher.url, "model": teacher.model, "max_model_len": info.get("max_model_len"),
            "probe_ids": ids, "probe_logprobs": [round(float(x), 6) for x in lp]}


def served_changes(old: dict, new: dict) -> list[str]:
    """What differs between two served-teacher fingerprints, one line each."""
    out = []
    for key in ("model", "max_model_len"):
        if old.get(key) != new.get(key):
            out.append(f"served {key}: {old.get(key)!r} -> {new.get(key)!r}")
    if old.get("probe_ids") != new.get("probe_ids"):
        out.append("probe: other token ids (the student's tokenizer changed)")
        return out
    a, b = np.asarray(old.get("probe_logprobs") or [], float), np.asarray(new.get("probe_logprobs") or [], float)
    if a.shape != b.shape:
        out.append(f"probe log-probs: {a.size} -> {b.size} values")
    elif a.size and not np.all(np.abs(a - b) <= PROBE_ATOL):
        i = int(np.argmax(np.abs(a - b)))
        out.append(f"probe log-probs differ by up to {abs(a[i] - b[i]):.4g} (> {PROBE_ATOL}) at token {i + 1}: "
                   f"{a[i]:.6f} -> {b[i]:.6f}; the server serves other weights")
    return out
