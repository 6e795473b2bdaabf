"""One decoder-only transformer (Llama / Qwen2 / Qwen3) in Flax NNX, with a KV cache.

The three families differ only by config flags: Qwen2 adds biases to the q/k/v projections,
Qwen3 RMS-normalises each query/key head before RoPE, Llama may carry attention / MLP biases.
Numerics follow transformers 5 (modeling_llama / qwen2 / qwen3): RMSNorm in float32 then cast
back before the weight multiply, rotate-half RoPE with float32 frequencies, float32 softmax.

Every parameter carries ``logical_axes`` metadata (see scope_jax.sharding) so a loader can
place it straight onto its mesh sharding.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from scope_jax.models.attention import (_attend_block, attend, attend_decode, attention,  # noqa: F401
                                        paged_attention, write_kv)
from scope_jax.sharding import constrain, logical_to_spec

# Remat policies of the scanned decoder layers (the names follow MaxText's remat_policy).
REMAT_POLICIES = {
    "none": None,  # no scan-level checkpoint: every layer's activations are kept
    "full": jax.checkpoint_policies.nothing_saveable,  # keep the layer input only
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # + matmul outputs
}

SUPPORTED = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# RoPE scaling types implemented (transformers 5 modeling_rope_utils): rope_type -> (keys that
# must be present, keys its frequencies may read). Other keys are ignored, as transformers does.
ROPE_SCALING_KEYS = {
    "linear": (("factor",), ("factor",)),
    "dynamic": (("factor",), ("factor",)),
    "yarn": (("factor", "original_max_position_embeddings"),
             ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
              "beta_slow", "mscale", "mscale_all_dim", "truncate")),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
               ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")),
}

# Logical axes of Cache.k / Cache.v: [layers, batch, cache_length, kv_heads, head_dim].
CACHE_LOGICAL_AXES = ("layers", "batch", "cache_length", "act_kv_heads", "head_dim")
# Logical axes of each layer's DecodeCache.k[i] / DecodeCache.v[i]: [kv_heads, batch,
# head_dim, cache_length].
DECODE_CACHE_LOGICAL_AXES = ("act_kv_heads", "batch", "head_dim", "cache_length")


def _as_tuple(x: Any) -> tuple[int, ...] | int | None:
    return tuple(x) if isinstance(x, (list, tuple)) else x


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder-only model (hashable, so it can live in an NNX graphdef)."""

    model_type: str  # 'llama' | 'qwen2' | 'qwen3'
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 (always), Llama / Qwen3 with attention_bias
    o_bias: bool = False  # Llama / Qwen3 with attention_bias
    mlp_bias: bool = False  # Llama with mlp_bias
    qk_norm: bool = False  # Qwen3
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    max_position_embeddings: int = 2048
    # RoPE scaling as sorted (key, value) pairs, e.g. (("factor", 8.0), ..., ("rope_type",
    # "llama3")); () is plain RoPE. The keys are transformers' rope_parameters minus rope_theta
    # (see ROPE_SCALING_KEYS). A dict is accepted and stored as its sorted items (hashable).
    rope_scaling: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Builds the config from a Hugging Face config.json dict.

        Raises:
          NotImplementedError naming the architecture, rope_type, activation or sliding-window
            setting when the checkpoint needs something this model does not implement.
          ValueError naming the field when a required field is missing or inconsistent.
        """
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if model_type not in SUPPORTED or any(a not in SUPPORTED.values() for a in archs):
            raise NotImplementedError(
                f"{source}: unsupported architecture {archs or None} (model_type {model_type!r}); "
                f"supported: {sorted(SUPPORTED.values())}")

        def need(key):
            if d.get(key) is None:
                raise ValueError(f"{source}: required field {key!r} is missing")
            return d[key]

        # transformers 5 lets a legacy rope_scaling dict override rope_parameters, and fills
        # rope_theta from the top level when the chosen dict lacks it; mirror that precedence.
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        if not isinstance(rope, dict) or ("rope_type" not in rope and "type" not in rope
                                          and any(isinstance(v, dict) for v in rope.values())):
            raise NotImplementedError(f"{source}: per-layer-type rope_parameters are not supported")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in (None, "default") and rope_type not in ROPE_SCALING_KEYS:
            raise NotImplementedError(
                f"{source}: rope_type {rope_type!r} is not implemented (implemented: 'default', "
                f"{', '.join(repr(t) for t in ROPE_SCALING_KEYS)})")
        partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
        if partial not in (None, 1, 1.0):
            raise NotImplementedError(f"{source}: partial_rotary_factor={partial} is not implemented")
        theta = rope.get("rope_theta", d.get("rope_theta"))
        theta = 10000.0 if theta is None else float(theta)
        scaling = () if rope_type in (None, "default") else _rope_scaling_from_hf(
            rope_type, rope, d, "rope_scaling" if d.get("rope_scaling") else "rope_parameters",
            source)

        act = d.get("hidden_act", d.get("hidden_activation", "silu"))
        if act != "silu":
            raise NotImplementedError(f"{source}: hidden_act {act!r} is not implemented (only 'silu')")
        num_layers = int(need("num_hidden_layers"))
        layer_types = d.get("layer_types")
        if layer_types is None and d.get("use_sliding_window") and d.get("sliding_window"):
            first = d.get("max_window_layers", 0)
            layer_types = ["sliding_attention" if i >= first else "full_attention"
                           for i in range(num_layers)]
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise NotImplementedError(
                f"{source}: sliding-window attention layers ({sorted(set(layer_types))}) "
                "are not implemented")

        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        head_dim = d.get("head_dim")
        if head_dim is None:  # transformers' defaults when config.json omits it
            head_dim = 128 if model_type == "qwen3" else hidden // heads
        kv_heads = int(d.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ValueError(f"{source}: num_attention_heads={heads} is not a multiple of "
                             f"num_key_value_heads={kv_heads}")
        attention_bias = bool(d.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(head_dim),
            intermediate_size=int(need("intermediate_size")),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=model_type == "llama" and bool(d.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=_as_tuple(d.get("eos_token_id")),
            pad_token_id=d.get("pad_token_id"),
            max_position_embeddings=int(d.get("max_position_embeddings") or 2048),
            rope_scaling=scaling,
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        """Reads ``path/config.json`` (or ``path`` itself when it is a .json file)."""
        path = os.fspath(path)
        file = path if path.endswith(".json") else os.path.join(path, "config.json")
        try:
            with open(file) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {file}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None
        return cls.from_hf(d, source=file)

    def to_hf(self, dtype: str | None = None) -> dict[str, Any]:
        """The config.json dict transformers' AutoConfig reads back into the same architecture."""
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        d = {
            "architectures": [SUPPORTED[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            # both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta,
                                **dict(self.rope_scaling)},
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "qwen2":
            if self.o_bias or self.mlp_bias or not self.qkv_bias:
                raise ValueError("qwen2 requires qkv_bias=True, o_bias=False, mlp_bias=False")
            d["use_sliding_window"] = False
        else:
            if self.qkv_bias != self.o_bias:
                raise ValueError(f"{self.model_type}: attention_bias covers q, k, v and o alike")
            d["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            d["mlp_bias"] = self.mlp_bias
        if self.model_type == "qwen3":
            d["use_sliding_window"] = False
        if self.rope_scaling:  # transformers 4.x reads the scaling from here
            d["rope_scaling"] = dict(self.rope_scaling)
        if dtype is not None:
            d["dtype"] = dtype
        return d


def _rope_scaling_from_hf(rope_type: str, rope: dict, d: dict, field: str,
                          source: str) -> tuple[tuple[str, Any], ...]:
    """ModelConfig.rope_scaling from config.json's chosen RoPE dict ``rope`` (at ``field``).

    Mirrors transformers 5's standardize_rope_params: for llama3 / yarn a top-level
    original_max_position_embeddings wins over the dict's, else it defaults to
    max_position_embeddings; a required key that is missing is an error (transformers raises
    KeyError), other unread keys are dropped (transformers ignores them with a warning).
    """
    rope = dict(rope)
    required, read = ROPE_SCALING_KEYS[rope_type]
    if "original_max_position_embeddings" in required:
        if "original_max_position_embeddings" in d:
            rope["original_max_position_embeddings"] = d["original_max_position_embeddings"]
        else:
            rope.setdefault("original_max_position_embeddings", d.get("max_position_embeddings"))
    for key in required:
        if key not in rope or (rope[key] is None and not (rope_type == "yarn" and key == "factor")):
            raise ValueError(f"{source}: {field}[{key!r}] is required for rope_type "
                             f"{rope_type!r} and is missing or null")
    for key in read:
        value = rope.get(key)
        if value is not None and (isinstance(value, bool) != (key == "truncate")
                                  or not isinstance(value, (int, float))):
            raise ValueError(f"{source}: {field}[{key!r}] must be a "
                             f"{'bool' if key == 'truncate' else 'number'}, got {value!r}")
    return tuple(sorted([("rope_type", rope_type)] + [(k, rope[k]) for k in read if k in rope]))


# ----------------------------------------------------------------------------------------------
# Layers


def _normal(rngs: nnx.Rngs, shape, dtype, std: float = 0.02) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] (the transpose of torch's Linear.weight)."""

    def __init__(self, din: int, dout: int, axes: tuple[str, str], *, bias: bool, dtype,
                 param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = nnx.Param(_normal(rngs, (din, dout), param_dtype), logical_axes=axes)
        self.bias = (nnx.Param(jnp.zeros((dout,), param_dtype), logical_axes=(axes[1],))
                     if bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., din] (compute dtype) -> [..., dout] (compute dtype)."""
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """transformers' RMSNorm: normalise in float32, cast back, then multiply by the weight."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.eps, self.dtype = eps, dtype
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., dim] -> [..., dim] in the compute dtype."""
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * x32.astype(self.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: tuple = (),
                  max_positions: int = 2048) -> tuple[np.ndarray, float]:
    """Static RoPE inverse frequencies and the cos/sin factor, as transformers 5 computes them.

    Follows modeling_rope_utils (transformers 5.24) step by step in float32, with its defaults
    (yarn: beta_fast 32, beta_slow 1, truncate True, attention_factor from factor / mscale;
    factor None -> max_positions / original_max_position_embeddings).

    Args:
      head_dim: D (all of it is rotated).
      theta: rope_theta.
      scaling: ModelConfig.rope_scaling (sorted (key, value) pairs; () for plain RoPE).
      max_positions: ModelConfig.max_position_embeddings.
    Returns:
      (inv_freq float32 [D // 2], attention_factor). For 'dynamic' these are the frequencies
      of sequences up to max_positions; rope_cos_sin rescales longer ones.
    """
    p = dict(scaling)
    kind = p.get("rope_type", "default")
    dim = head_dim
    exponents = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
    if kind == "dynamic":  # transformers' init value: base at seq_len = max_positions (float64)
        factor = p["factor"]
        theta = theta * ((factor * max_positions / max_positions) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = np.float32(1.0) / (np.float32(theta) ** exponents)
    if kind in ("default", "dynamic"):
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / np.float32(p["factor"]), 1.0
    if kind == "llama3":
        factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old = p["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = np.float32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > np.float32(low_wavelen), inv_freq / np.float32(factor), inv_freq)
        smooth = (np.float32(old) / wavelen - np.float32(low)) / np.float32(high - low)
        smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
        medium = ~(wavelen < np.float32(high_wavelen)) & ~(wavelen > np.float32(low_wavelen))
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    if kind == "yarn":
        original = p["original_max_position_embeddings"]
        factor = p.get("factor")
        if factor is None:
            factor = max_positions / original
        attention_factor = p.get("attention_factor")
        if attention_factor is None:
            def mscale(scale, m=1):
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
            m, m_all = p.get("mscale"), p.get("mscale_all_dim")
            attention_factor = (float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all
                                else mscale(factor))
        beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

        def correction_dim(rotations):
            return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if p.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001  # transformers' guard against a zero-width ramp
        pos_freqs = np.float32(theta) ** exponents
        extrapolation = np.float32(1.0) / pos_freqs
        interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(lo))
                       / np.float32(hi - lo), 0, 1)
        keep = 1 - ramp  # share of the extrapolated (unscaled) frequency
        return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32), attention_factor
    raise NotImplementedError(f"rope_type {kind!r} is not implemented")


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float, dtype, scaling: tuple = (),
                 max_positions: int = 2048) -> tuple[jax.Array, jax.Array]:
    """RoPE tables for the rotate-half convention, with optional scaling (see rope_inv_freq).

    'dynamic' (NTK) scaling follows transformers 5's dynamic_rope_update for one call: with
    seq_len = max(positions) + 1 over the whole batch, frequencies are recomputed from theta *
    (factor * seq_len / max_positions - (factor - 1)) ** (D / (D - 2)) when seq_len >
    max_positions, else the unscaled ones. transformers computes seq_len the same way in every
    forward (with or without a cache), so a decode step uses its own position and the cached
    keys keep the frequencies they were rotated with, as there. Unlike transformers, this has
    no memory across calls: transformers' rotary module keeps the longest seq_len it has seen
    and reuses those frequencies for later calls whose seq_len is between max_positions and it.

    Args:
      positions: int [B, T].
      head_dim, theta, scaling, max_positions: ModelConfig.head_dim, rope_theta, rope_scaling,
        max_position_embeddings.
    Returns:
      cos, sin: [B, T, head_dim] in ``dtype`` (computed in float32, as transformers, and
      multiplied by the scaling's attention factor, which is 1 except for yarn).
    """
    inv_freq, attention_factor = rope_inv_freq(head_dim, theta, scaling, max_positions)
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
    p = dict(scaling)
    if p.get("rope_type") == "dynamic":
        seq_len = jnp.max(positions).astype(jnp.int32) + 1
        length = jnp.maximum(seq_len, max_positions).astype(jnp.float32)
        factor = p["factor"]
        base = theta * ((factor * length / max_positions) - (factor - 1)) ** (head_dim / (head_dim - 2))
        scaled = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
        inv_freq = jnp.where(seq_len > max_positions, scaled, inv_freq)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if attention_factor != 1.0:
        cos, sin = cos * np.float32(attention_factor), sin * np.float32(attention_factor)
    return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, D]; cos/sin [B, T, D] -> x rotated, same shape and dtype."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class Attention(nnx.Module):
    """Self-attention with GQA, optional q/k/v/o biases and optional per-head q/k RMSNorm."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs, rules=None,
                 attention_chunk: int | None = None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        h, n, kh, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.n, self.kh, self.d, self.rules, self.chunk = n, kh, d, rules, attention_chunk
        self.q_proj = Dense(h, n * d, ("embed", "heads"), bias=cfg.qkv_bias, **kw)
        self.k_proj = Dense(h, kh * d, ("embed", "kv_heads"), bias=cfg.qkv_bias, **kw)
        self.v_proj = Dense(h, kh * d, ("embed", "kv_heads"), bias=cfg.qkv_bias, **kw)
        self.o_proj = Dense(n * d, h, ("heads", "embed"), bias=cfg.o_bias, **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        else:
            self.q_norm = self.k_norm = None

    def _qkv(self, x, cos, sin):
        """Queries [B, T, N, D], keys and values [B, T, K, D], normed and rotated."""
        b, t, _ = x.shape
        act = ("batch", "length", "act_heads", "head_dim")
        kv_act = ("batch", "length", "act_kv_heads", "head_dim")
        q = constrain(self.q_proj(x).reshape(b, t, self.n, self.d), act, self.rules)
        k = constrain(self.k_proj(x).reshape(b, t, self.kh, self.d), kv_act, self.rules)
        v = constrain(self.v_proj(x).reshape(b, t, self.kh, self.d), kv_act, self.rules)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _pool_layout(self, x: jax.Array, axis: int) -> jax.Array:
        """x with its KV-head axis `axis` (of K heads, or 2K combined K/V heads in a page pool)
        split as act_kv_heads splits K heads, the other axes replicated (under a mesh)."""
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return x
        heads = logical_to_spec(("act_kv_heads",), self.rules, shape=(self.kh,), mesh=mesh)[0]
        spec = [None] * x.ndim
        spec[axis] = heads
        return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))

    def paged(self, x, cos, sin, kv_pages, batch: "PagedBatch"):
        """Attention over a paged KV cache (the continuous engine's prefill and decode).

        x [B, T, H], cos/sin [B, T, D]: one ragged row (B = 1: T tokens of several sequences,
        laid out as batch.cu_q_lens says), or, with batch.segment_ids, B rows of whole
        sequences; kv_pages [P, page_size, 2K, D] this layer's page pool. The new keys/values
        go to batch.slots first; then each token attends causally within its own sequence:
        over this call's keys (segment_ids given) or over its sequence's pages. Returns
        (out [B, T, H], updated kv_pages).
        """
        b, t, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        # The pool and the new keys / values keep one layout (KV heads split like
        # act_kv_heads when they divide, else replicated): left free, the partitioner may
        # re-lay the whole pool out every step to meet the scatter.
        flat_k, flat_v = (self._pool_layout(a.reshape(b * t, self.kh, self.d), 1) for a in (k, v))
        kv_pages = self._pool_layout(write_kv(self._pool_layout(kv_pages, 2), flat_k, flat_v,
                                              batch.slots.reshape(-1)), 2)
        if batch.segment_ids is not None:  # whole sequences: the packed self-attention path
            seg = batch.segment_ids.reshape(b, t)
            out = attention(q, k.astype(kv_pages.dtype).astype(q.dtype),
                            v.astype(kv_pages.dtype).astype(q.dtype),
                            jnp.arange(t, dtype=jnp.int32), seg, self.d ** -0.5,
                            chunk=self.chunk, rules=self.rules)
            return self.o_proj(out), kv_pages
        out = paged_attention(q[0].astype(kv_pages.dtype), kv_pages, batch.kv_lens,
                              batch.page_indices, batch.cu_q_lens, batch.num_seqs,
                              sm_scale=self.d ** -0.5, implementation=batch.implementation)
        out = out.astype(x.dtype).reshape(1, t, self.n * self.d)
        return self.o_proj(out), kv_pages

    def __call__(self, x, cos, sin, mask, kv=None):
        """x [B, T, H]; cos/sin [B, T, D]; mask = (q_slot int32 [T], kv_valid bool [B, S] or
        int32 segment ids [B, S], see attention.segments_allowed).

        kv: None (attend to this call's own keys, S == T) or (k_all, v_all, layer, index) with
          k_all/v_all a Cache's [L, B, S, K, D] arrays and layer an int, or (k, v, None, index,
          context) with this layer's DecodeCache arrays k, v [K, B, D, S] and its PageContext
          pages (attend_decode's context; None: none). The new
          keys/values are written at slots [index, index + T) and attention runs over all S
          slots.
        Returns (out [B, T, H], updated (k_all, v_all) or None).
        """
        t = x.shape[1]
        q, k, v = self._qkv(x, cos, sin)
        new_kv = None
        if kv is not None and kv[2] is None:  # DecodeCache layer
            k_t, v_l, _, index, context = kv
            k_t = jax.lax.dynamic_update_slice(
                k_t, k.transpose(2, 0, 3, 1).astype(k_t.dtype), (0, 0, 0, index))
            v_l = jax.lax.dynamic_update_slice(
                v_l, v.transpose(2, 0, 3, 1).astype(v_l.dtype), (0, 0, 0, index))
            new_kv = (k_t, v_l)
            if self.chunk is None or t <= self.chunk or context is not None:
                out = attend_decode(q, k_t.astype(q.dtype), v_l.astype(q.dtype), mask[0],
                                    mask[1], self.d ** -0.5, context)
            else:  # a long prefill: attend's query chunks bound the scores' memory
                out = attend(q, k_t.transpose(1, 3, 0, 2).astype(q.dtype),
                             v_l.transpose(1, 3, 0, 2).astype(q.dtype), mask[0], mask[1],
                             self.d ** -0.5, self.chunk)
            return self.o_proj(out), new_kv
        if kv is not None:
            k_all, v_all, layer, index = kv
            start = (layer, 0, index, 0, 0)
            k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), start)
            v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), start)
            new_kv = (k_all, v_all)
            k, v = k_all[layer].astype(q.dtype), v_all[layer].astype(q.dtype)
        out = attention(q, k, v, mask[0], mask[1], self.d ** -0.5, chunk=self.chunk,
                        rules=self.rules)
        return self.o_proj(out), new_kv


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs, rules=None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.rules = rules
        self.gate_proj = Dense(h, i, ("embed", "mlp"), bias=cfg.mlp_bias, **kw)
        self.up_proj = Dense(h, i, ("embed", "mlp"), bias=cfg.mlp_bias, **kw)
        self.down_proj = Dense(i, h, ("mlp", "embed"), bias=cfg.mlp_bias, **kw)

    def __call__(self, x):
        """x [B, T, H] -> [B, T, H]."""
        y = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(constrain(y, ("batch", "length", "act_mlp"), self.rules))


class Block(nnx.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs, rules=None,
                 attention_chunk: int | None = None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, rules=rules)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype,
                                       param_dtype=param_dtype)
        self.self_attn = Attention(cfg, **kw, attention_chunk=attention_chunk)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype,
                                                param_dtype=param_dtype)
        self.mlp = MLP(cfg, **kw)

    def __call__(self, x, cos, sin, mask, kv=None):
        """x [B, T, H] -> ([B, T, H], updated kv or None); see Attention for kv."""
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv

    def paged(self, x, cos, sin, kv_pages, batch: "PagedBatch"):
        """As __call__ over a paged cache (Attention.paged): -> ([1, T, H], kv_pages)."""
        a, kv_pages = self.self_attn.paged(self.input_layernorm(x), cos, sin, kv_pages, batch)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv_pages


@flax.struct.dataclass
class Cache:
    """KV cache: k, v [L, B, S, K, D] (layers, batch, slots, kv heads, head dim)."""

    k: jax.Array
    v: jax.Array


@flax.struct.dataclass
class DecodeCache:
    """KV cache laid out for fast one-token decode steps (see Transformer.init_decode_cache).

    k, v: tuples of L arrays [K, B, D, S] (kv heads, batch, head dim, slots; logical axes
      DECODE_CACHE_LOGICAL_AXES).
    context: None, or PageContext: chunks of keys and values each row attends to besides its
      slots (read only; the continuous engine's decode blocks: a row's context so far in its
      pages, the block's new tokens in the slots).
    One array per layer, because reading a layer out of a stacked [L, ...] array costs XLA a
    copy of that layer every step. The batch stays on axis 1, as in Cache, so one sharding
    rule serves both.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    context: "PageContext | None" = None


@flax.struct.dataclass
class PageContext:
    """Read-only keys and values attended to by a DecodeCache's rows besides its slots, in
    chunks of a row's context (attention does not depend on the order of keys: RoPE is
    applied already).

    k, v: tuples of L arrays [K, C, D, T] (C chunks of T tokens, transposed as a DecodeCache
    layer); row int32 [C]: the batch row each chunk belongs to (>= B: padding, read by none);
    length int32 [C]: valid tokens from the chunk's start (attention.attend_pages). row None:
    one chunk per row, C == B (attention.attend_rows).
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    row: jax.Array | None
    length: jax.Array


@flax.struct.dataclass
class PagedBatch:
    """Where the tokens of one forward over a paged KV cache go and what they attend to (the
    arguments of scope_jax.models.attention.paged_attention / write_kv).

    Two layouts:
      * ragged (input_ids [T], segment_ids None): S sequences at most, T tokens, sequence i's
        tokens at [cu_q_lens[i], cu_q_lens[i+1]), attending over their sequences' pages
        (decode steps, chunks that continue a sequence);
      * whole sequences (input_ids [T] or [B, T], segment_ids the same shape): every sequence
        from its first token, attention within each one over this call's own keys (the
        packed self-attention path, the backend's kernel), the pages only written. [B, T]
        holds one sequence per row (the engine's prefill: no T x T scores across rows).

    slots:        int32, input_ids' shape: flat cache slot (page * page_size + offset) each
                  token's K/V is written to; negative: padding, not written
    kv_lens:      int32 [S]     tokens of each sequence in the cache once these are written
    page_indices: int32 [S, n]  each sequence's pages in order (entries past its length unused)
    cu_q_lens:    int32 [S + 1] cumulative query counts
    num_seqs:     int32 [1]     sequences in use (the first num_seqs of S)
                  (these four: read by the ragged layout only; None with segment_ids)
    segment_ids:  int32, input_ids' shape, or None: each token's sequence (0 on padding)
    implementation: paged_attention's (None: its default for the backend); static
    """

    slots: jax.Array
    kv_lens: jax.Array | None = None
    page_indices: jax.Array | None = None
    cu_q_lens: jax.Array | None = None
    num_seqs: jax.Array | None = None
    segment_ids: jax.Array | None = None
    implementation: str | None = flax.struct.field(pytree_node=False, default=None)


def _layer_context(context: PageContext | None, layer: int):
    """attend_decode's context argument for `layer` (None without a PageContext)."""
    if context is None:
        return None
    return context.k[layer], context.v[layer], context.row, context.length


def default_positions(attention_mask: jax.Array | None, batch: int, length: int) -> jax.Array:
    """int32 [B, T]: arange, or (cumsum(mask) - 1) clipped at 0 so left padding starts at 0."""
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """int32 [B, T]: each token's index within its segment of a packed row.

    segment_ids: int [B, T]; a segment is a maximal run of one id (the packer gives adjacent
    sequences different ids), so each packed sequence starts again at position 0, as it would
    alone in a row of its own (default_positions of its real tokens).
    """
    t = segment_ids.shape[1]
    slot = jnp.arange(t, dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return slot - jax.lax.cummax(jnp.where(starts, slot, 0), axis=1)


class Transformer(nnx.Module):
    """Decoder-only LM covering Llama, Qwen2 and Qwen3 (see ModelConfig for the flags).

    Args:
      config: the architecture.
      dtype: compute dtype (activations, matmul inputs); logits are always float32.
      param_dtype: storage dtype of the parameters.
      rngs: initialisation randomness (normal(0.02) kernels, unit norms, zero biases).
      rules: logical-axis rules for activation sharding constraints (default
        scope_jax.sharding.DEFAULT_RULES); constraints apply only under jax.set_mesh.
      remat: what each decoder layer keeps for the backward pass of a forward without a
        cache: a REMAT_POLICIES name ("full": only the layer's input, everything else is
        recomputed; "minimal": also the matmul outputs; "none": everything), or a bool
        (True = "full", False = "none"). Cached (sampling) forwards never rematerialise.
      attention_chunk: queries per attention block (see attend); bounds the attention scores'
        memory for long sequences. None: all queries at once.
    """

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs, rules=None, remat: bool | str = False,
                 attention_chunk: int | None = 1024):
        if isinstance(remat, bool):
            remat = "full" if remat else "none"
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}; expected a bool or one of {sorted(REMAT_POLICIES)}")
        self.config, self.dtype, self.param_dtype, self.remat = config, dtype, param_dtype, remat
        self.rules = None if rules is None else tuple(
            (k, tuple(v) if isinstance(v, list) else v) for k, v in
            (rules.items() if isinstance(rules, dict) else rules))
        cfg = config
        self.embed_tokens = nnx.Param(
            _normal(rngs, (cfg.vocab_size, cfg.hidden_size), param_dtype),
            logical_axes=("vocab", "embed"))
        self.layers = nnx.List([
            Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, rules=self.rules,
                  attention_chunk=attention_chunk)
            for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.lm_head = (None if cfg.tie_word_embeddings else nnx.Param(
            _normal(rngs, (cfg.hidden_size, cfg.vocab_size), param_dtype),
            logical_axes=("embed", "vocab")))

    # -- core ----------------------------------------------------------------------------------

    def _run(self, input_ids, positions, mask, kv_all=None, index=None):
        """Embed, run the layers, final norm. Returns ([B, T, H] compute dtype, kv_all)."""
        x, cos, sin = self._embed(input_ids, positions)
        if kv_all is None:
            return self.norm(self._scan_layers(x, cos, sin, mask)), None
        # Cached forwards (prefill and decode steps) run the layers as a Python loop: each layer
        # keeps its own cache arrays (see DecodeCache) and there is no backward pass to save for.
        per_layer = isinstance(kv_all, DecodeCache)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            kv = ((kv_all.k[i], kv_all.v[i], None, index, _layer_context(kv_all.context, i))
                  if per_layer else (kv_all[0], kv_all[1], i, index))
            x, kv = layer(x, cos, sin, mask, kv)
            if per_layer:
                new_k.append(kv[0])
                new_v.append(kv[1])
            else:
                kv_all = kv
            x = constrain(x, ("batch", "length", "act_embed"), self.rules)
        if per_layer:
            kv_all = DecodeCache(k=tuple(new_k), v=tuple(new_v), context=kv_all.context)
        return self.norm(x), kv_all

    def _embed(self, input_ids, positions):
        """Token embeddings [B, T, H] (compute dtype) and the RoPE tables cos, sin [B, T, D]."""
        ids = jnp.asarray(input_ids, jnp.int32)
        # The table's FSDP-sharded embed axis is gathered before the lookup (as any FSDP weight
        # before its use); looking up in the sharded table makes XLA gather the rows instead.
        table = constrain(self.embed_tokens[...], ("vocab", None), self.rules)
        x = jnp.take(table, ids, axis=0).astype(self.dtype)
        x = constrain(x, ("batch", "length", "act_embed"), self.rules)
        c = self.config
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, self.dtype, c.rope_scaling,
                                c.max_position_embeddings)
        return x, cos, sin

    def _scan_layers(self, x, cos, sin, mask):
        """The decoder layers as one lax.scan over their stacked parameters: x [B, T, H] -> same.

        Parameters stay one module per layer (the Hugging Face layout, and the sampler's fast
        per-layer decode path); the forward stacks them ([L, ...], sharded like each layer's
        parameter on the other axes) and scans one compiled layer body over them, so compile
        time does not grow with depth, and under remat the backward pass keeps only what the
        policy saves per layer (with "full": the [B, T, H] layer input) instead of every
        layer's activations. The stacked copy costs one extra parameter set per device.
        """
        graphdef = nnx.graphdef(self.layers[0])
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(nnx.state(l) for l in self.layers))

        def body(x, layer_state):
            y, _ = nnx.merge(graphdef, layer_state)(x, cos, sin, mask)
            return constrain(y, ("batch", "length", "act_embed"), self.rules), None

        policy = REMAT_POLICIES[self.remat]
        if policy is not None:
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        x, _ = jax.lax.scan(body, x, stacked)
        return x

    def lm_head_weight(self) -> jax.Array:
        """Unembedding matrix [H, V] in the compute dtype (embed_tokens.T when tied)."""
        w = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
        return w.astype(self.dtype)

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """hidden [B, T, H] -> float32 logits [B, T, V] (matmul accumulated in float32)."""
        logits = jnp.einsum("bth,hv->btv", hidden.astype(self.dtype), self.lm_head_weight(),
                            preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "act_vocab"), self.rules)

    @staticmethod
    def _full_mask(attention_mask, batch, length, segment_ids=None):
        """(q_slot [T], kv_valid [B, T]) for a forward pass without a cache; kv_valid is the
        int32 segment ids when given (packed rows, see attention.segments_allowed)."""
        if segment_ids is not None:
            valid = jnp.asarray(segment_ids, jnp.int32)
        else:
            valid = (jnp.ones((batch, length), bool) if attention_mask is None
                     else jnp.asarray(attention_mask).astype(bool))
        return jnp.arange(length, dtype=jnp.int32), valid

    # -- public --------------------------------------------------------------------------------

    def hidden(self, input_ids, positions=None, attention_mask=None, segment_ids=None) -> jax.Array:
        """Final-norm hidden states.

        Args:
          input_ids: int32 [B, T].
          positions: int32 [B, T] RoPE positions (default: default_positions, or
            segment_positions with segment_ids).
          attention_mask: bool/int [B, T], 1 for real tokens; padding on either side is never
            attended to (outputs at padded positions are meaningless).
          segment_ids: int32 [B, T] instead of attention_mask, for packed rows: several
            sequences per row, each a run of one id > 0 (0 = padding); attention stays causal
            within each sequence, so each one's hidden states equal its forward alone.
        Returns:
          [B, T, H] in the compute dtype.
        """
        b, t = input_ids.shape
        if segment_ids is not None and attention_mask is not None:
            raise ValueError("hidden: pass attention_mask or segment_ids, not both (segment id 0 "
                             "marks padding)")
        if positions is None:
            positions = (default_positions(attention_mask, b, t) if segment_ids is None
                         else segment_positions(jnp.asarray(segment_ids, jnp.int32)))
        h, _ = self._run(input_ids, positions, self._full_mask(attention_mask, b, t, segment_ids))
        return h

    def __call__(self, input_ids, positions=None, attention_mask=None) -> jax.Array:
        """Logits: input_ids int32 [B, T] -> float32 [B, T, V]; arguments as in hidden()."""
        return self.logits_from_hidden(self.hidden(input_ids, positions, attention_mask))

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> Cache:
        """Zero KV cache with k, v of shape [L, B, max_len, K, D] (dtype: compute dtype)."""
        c = self.config
        shape = (c.num_layers, batch_size, max_len, c.num_kv_heads, c.head_dim)
        dtype = self.dtype if dtype is None else dtype
        return Cache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    def init_decode_cache(self, batch_size: int, max_len: int, dtype=None) -> DecodeCache:
        """Zero DecodeCache for batch_size rows and max_len slots (dtype: compute dtype).

        Same slots and semantics as init_cache, in a layout that makes forward_cached's
        one-token steps several times faster on CPU (the sampler's decode loop uses it).
        """
        c = self.config
        dtype = self.dtype if dtype is None else dtype
        shape = (c.num_kv_heads, batch_size, c.head_dim, max_len)
        return DecodeCache(k=tuple(jnp.zeros(shape, dtype) for _ in range(c.num_layers)),
                           v=tuple(jnp.zeros(shape, dtype) for _ in range(c.num_layers)))

    def init_pages(self, num_pages: int, page_size: int, dtype=None) -> tuple[jax.Array, ...]:
        """Zero paged KV cache: one page pool [num_pages, page_size, 2K, D] per layer, keys and
        values of each KV head interleaved (the layout of paged_attention; dtype: compute)."""
        c = self.config
        dtype = self.dtype if dtype is None else dtype
        shape = (num_pages, page_size, 2 * c.num_kv_heads, c.head_dim)
        return tuple(jnp.zeros(shape, dtype) for _ in range(c.num_layers))

    def forward_paged(self, input_ids, positions, kv_pages: tuple[jax.Array, ...],
                      batch: PagedBatch) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """Forward over a paged KV cache: prefill chunks and decode tokens of several
        sequences in one call (see PagedBatch for the layout).

        Args:
          input_ids, positions: int32 [T] (one ragged row), or [B, T] (B whole sequences, one
            per row, padded at the end; needs batch.segment_ids [B, T]); positions: each
            token's RoPE position, its index in its own sequence.
          kv_pages: one [P, page_size, 2K, D] pool per layer (init_pages).
        Returns:
          (final-norm hidden states [T, H] or [B, T, H] in the compute dtype, the updated
          pools). Take the logits of the rows you need with logits_from_hidden.
        """
        ids = jnp.asarray(input_ids, jnp.int32)
        pos = jnp.asarray(positions, jnp.int32)
        ragged = ids.ndim == 1
        x, cos, sin = self._embed(ids[None] if ragged else ids, pos[None] if ragged else pos)
        new = []
        for layer, pages in zip(self.layers, kv_pages):
            x, pages = layer.paged(x, cos, sin, pages, batch)
            new.append(pages)
        x = self.norm(x)
        return (x[0] if ragged else x), tuple(new)

    def forward_cached(self, input_ids, positions, cache: Cache | DecodeCache, cache_index,
                       kv_mask):
        """Prefill or decode step against a KV cache.

        Args:
          input_ids: int32 [B, T].
          positions: int32 [B, T], RoPE position of each new token (per row).
          cache: Cache with k, v [L, B, S, K, D], or a DecodeCache (same semantics; the
            returned cache has the same type).
          cache_index: int32 scalar (may be traced); new K/V go to slots [cache_index,
            cache_index + T).
          kv_mask: bool [B, S], which slots hold real tokens (including the T new ones).
            Query t attends to slot s iff s <= cache_index + t and kv_mask[b, s].
        Returns:
          (float32 logits [B, T, V], updated Cache).
        """
        b, t = input_ids.shape
        index = jnp.asarray(cache_index, jnp.int32)
        mask = (index + jnp.arange(t, dtype=jnp.int32), jnp.asarray(kv_mask, bool))
        if isinstance(cache, DecodeCache):
            h, new = self._run(input_ids, jnp.asarray(positions, jnp.int32), mask, cache, index)
            return self.logits_from_hidden(h), new
        h, (k, v) = self._run(input_ids, jnp.asarray(positions, jnp.int32), mask,
                              (cache.k, cache.v), index)
        return self.logits_from_hidden(h), Cache(k=k, v=v)
