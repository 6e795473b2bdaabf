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
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scope_jax.sharding import constrain

SUPPORTED = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

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
        if rope_type not in (None, "default"):
            raise NotImplementedError(
                f"{source}: rope_type {rope_type!r} is not implemented (only 'default' RoPE)")
        partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
        if partial not in (None, 1, 1.0):
            raise NotImplementedError(f"{source}: partial_rotary_factor={partial} is not implemented")
        theta = rope.get("rope_theta", d.get("rope_theta"))
        theta = 10000.0 if theta is None else float(theta)

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
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
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
        if dtype is not None:
            d["dtype"] = dtype
        return d


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


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """RoPE tables for the rotate-half convention.

    Args:
      positions: int [B, T].
    Returns:
      cos, sin: [B, T, head_dim] in ``dtype`` (frequencies computed in float32, as transformers).
    """
    inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32)
                                            / np.float32(head_dim)))
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, D]; cos/sin [B, T, D] -> x rotated, same shape and dtype."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def _attend_block(q, k, v, q_slot, kv_valid, scale):
    """attend() for one block of queries; see attend for shapes."""
    b, t, n, d = q.shape
    kh = k.shape[2]
    q = q.reshape(b, t, kh, n // kh, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    mask = (jnp.arange(k.shape[1], dtype=jnp.int32)[None, :] <= q_slot[:, None])[None]
    mask = mask & kv_valid[:, None, :]  # [B, T, S]
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, n * d)


def attend_decode(q: jax.Array, k_t: jax.Array, v_t: jax.Array, q_slot: jax.Array,
                  kv_valid: jax.Array, scale: float) -> jax.Array:
    """attend() for T new queries against a DecodeCache layer's own layout.

    Args:
      q: [B, T, N, D]; k_t, v_t: [K, B, D, S] (keys and values transposed).
      q_slot, kv_valid, scale: as in attend.
    Returns:
      [B, T, N * D] in v_t's dtype, the same attention as attend.

    The T queries and the G = N // K heads sharing a kv head are folded into one row axis, so
    both products are plain batched matmuls over (K, B) in the operands' stored layouts
    ([G*T, D] @ [D, S] and [D, S] @ [S, G*T]): XLA's CPU dot then reads the cache in place,
    where attend's einsums made it copy each layer's K and V into another order every step.
    (Values stored [K, B, S, D] with probs @ v measured the same; one layout serves both.)
    """
    b, t, n, d = q.shape
    kh = k_t.shape[0]
    g = n // kh
    rows = q.reshape(b, t, kh, g, d).transpose(2, 0, 3, 1, 4).reshape(kh, b, g * t, d)
    scores = jnp.matmul(rows, k_t, preferred_element_type=jnp.float32) * scale  # [K,B,G*T,S]
    mask = (jnp.arange(k_t.shape[3], dtype=jnp.int32)[None, :] <= q_slot[:, None])[None]
    mask = jnp.tile(mask & kv_valid[:, None, :], (1, g, 1))  # [B, G*T, S], rows (g, t)
    scores = jnp.where(mask[None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_t.dtype)
    out = jnp.matmul(v_t, probs.swapaxes(-1, -2))  # [K, B, D, G*T]
    return out.reshape(kh, b, d, g, t).transpose(1, 4, 0, 3, 2).reshape(b, t, n * d)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_slot: jax.Array, kv_valid: jax.Array,
           scale: float, chunk: int | None = None) -> jax.Array:
    """Causal grouped-query attention with a float32 softmax.

    Query t attends to key slot s iff s <= q_slot[t] and kv_valid[b, s].

    Args:
      q: [B, T, N, D]; k, v: [B, S, K, D] with N a multiple of K (query head h uses kv head
        h // (N // K), as transformers' repeat_kv).
      q_slot: int32 [T], the key slot each query occupies (arange(T) without a cache).
      kv_valid: bool [B, S], False at padding. Rows with no allowed key produce an average of
        all values instead of NaN (they are padding).
      chunk: if set and T > chunk, queries are processed ``chunk`` at a time (each chunk
        rematerialised in the backward pass), so the [B, N, T, S] scores never exist at once:
        peak memory is O(B * N * chunk * S). The result is the same exact softmax.
    Returns:
      [B, T, N * D] in v's dtype.
    """
    b, t, n, d = q.shape
    if chunk is None or t <= chunk:
        return _attend_block(q, k, v, q_slot, kv_valid, scale)
    num = -(-t // chunk)
    pad = num * chunk - t  # padded queries (slot -1) attend to nothing and are cut off below
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q_slot = jnp.pad(q_slot, (0, pad), constant_values=-1)
    qs = q.reshape(b, num, chunk, n, d).swapaxes(0, 1)
    slots = q_slot.reshape(num, chunk)
    block = jax.checkpoint(lambda a: _attend_block(a[0], k, v, a[1], kv_valid, scale))
    out = jax.lax.map(block, (qs, slots))  # [num, B, chunk, N * D]
    return out.swapaxes(0, 1).reshape(b, num * chunk, n * d)[:, :t]


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

    def __call__(self, x, cos, sin, mask, kv=None):
        """x [B, T, H]; cos/sin [B, T, D]; mask = (q_slot int32 [T], kv_valid bool [B, S]).

        kv: None (attend to this call's own keys, S == T) or (k_all, v_all, layer, index):
          with layer an int, k_all/v_all are a Cache's [L, B, S, K, D] arrays; with layer None,
          they are this layer's DecodeCache arrays k, v [K, B, D, S]. The new
          keys/values are written at slots [index, index + T) and attention runs over all S
          slots.
        Returns (out [B, T, H], updated (k_all, v_all) or None).
        """
        b, t, _ = x.shape
        act = ("batch", "length", "act_heads", "head_dim")
        kv_act = ("batch", "length", "act_kv_heads", "head_dim")
        q = constrain(self.q_proj(x).reshape(b, t, self.n, self.d), act, self.rules)
        k = constrain(self.k_proj(x).reshape(b, t, self.kh, self.d), kv_act, self.rules)
        v = constrain(self.v_proj(x).reshape(b, t, self.kh, self.d), kv_act, self.rules)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_kv = None
        if kv is not None and kv[2] is None:  # DecodeCache layer
            k_t, v_l, _, index = kv
            k_t = jax.lax.dynamic_update_slice(
                k_t, k.transpose(2, 0, 3, 1).astype(k_t.dtype), (0, 0, 0, index))
            v_l = jax.lax.dynamic_update_slice(
                v_l, v.transpose(2, 0, 3, 1).astype(v_l.dtype), (0, 0, 0, index))
            new_kv = (k_t, v_l)
            if self.chunk is None or t <= self.chunk:
                out = attend_decode(q, k_t.astype(q.dtype), v_l.astype(q.dtype), mask[0],
                                    mask[1], self.d ** -0.5)
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
        out = attend(q, k, v, mask[0], mask[1], self.d ** -0.5, self.chunk)
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
    One array per layer, because reading a layer out of a stacked [L, ...] array costs XLA a
    copy of that layer every step. The batch stays on axis 1, as in Cache, so one sharding
    rule serves both.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]


def default_positions(attention_mask: jax.Array | None, batch: int, length: int) -> jax.Array:
    """int32 [B, T]: arange, or (cumsum(mask) - 1) clipped at 0 so left padding starts at 0."""
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class Transformer(nnx.Module):
    """Decoder-only LM covering Llama, Qwen2 and Qwen3 (see ModelConfig for the flags).

    Args:
      config: the architecture.
      dtype: compute dtype (activations, matmul inputs); logits are always float32.
      param_dtype: storage dtype of the parameters.
      rngs: initialisation randomness (normal(0.02) kernels, unit norms, zero biases).
      rules: logical-axis rules for activation sharding constraints (default
        scope_jax.sharding.DEFAULT_RULES); constraints apply only under jax.set_mesh.
      remat: rematerialise each decoder layer in the backward pass (training memory).
      attention_chunk: queries per attention block (see attend); bounds the attention scores'
        memory for long sequences. None: all queries at once.
    """

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs, rules=None, remat: bool = False,
                 attention_chunk: int | None = 1024):
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
        ids = jnp.asarray(input_ids, jnp.int32)
        x = jnp.take(self.embed_tokens[...], ids, axis=0).astype(self.dtype)
        x = constrain(x, ("batch", "length", "act_embed"), self.rules)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, self.dtype)

        def call(layer, x, kv):
            return layer(x, cos, sin, mask, kv)

        if self.remat and kv_all is None:  # a cache means inference: no backward pass to save
            call = nnx.remat(call)
        per_layer = isinstance(kv_all, DecodeCache)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            if kv_all is None:
                kv = None
            elif per_layer:
                kv = (kv_all.k[i], kv_all.v[i], None, index)
            else:
                kv = (kv_all[0], kv_all[1], i, index)
            x, kv = call(layer, x, kv)
            if per_layer:
                new_k.append(kv[0])
                new_v.append(kv[1])
            elif kv is not None:
                kv_all = kv
            x = constrain(x, ("batch", "length", "act_embed"), self.rules)
        if per_layer:
            kv_all = DecodeCache(k=tuple(new_k), v=tuple(new_v))
        return self.norm(x), kv_all

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
    def _full_mask(attention_mask, batch, length):
        """(q_slot [T], kv_valid [B, T]) for a forward pass without a cache."""
        valid = (jnp.ones((batch, length), bool) if attention_mask is None
                 else jnp.asarray(attention_mask).astype(bool))
        return jnp.arange(length, dtype=jnp.int32), valid

    # -- public --------------------------------------------------------------------------------

    def hidden(self, input_ids, positions=None, attention_mask=None) -> jax.Array:
        """Final-norm hidden states.

        Args:
          input_ids: int32 [B, T].
          positions: int32 [B, T] RoPE positions (default: see default_positions).
          attention_mask: bool/int [B, T], 1 for real tokens; padding on either side is never
            attended to (outputs at padded positions are meaningless).
        Returns:
          [B, T, H] in the compute dtype.
        """
        b, t = input_ids.shape
        if positions is None:
            positions = default_positions(attention_mask, b, t)
        h, _ = self._run(input_ids, positions, self._full_mask(attention_mask, b, t))
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
