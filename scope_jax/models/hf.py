"""Hugging Face checkpoints (config.json + safetensors) <-> scope_jax Transformer.

Loading never materialises the whole model on one host: the model skeleton is built with
nnx.eval_shape (shapes only), each safetensors file is memory-mapped, and every parameter is
created with jax.make_array_from_callback on its NamedSharding, so each device's shard is read
from disk straight into that device. Saving streams one tensor at a time to disk.

safetensors' own numpy reader cannot represent bfloat16, hence the small reader/writer here
over the documented format (8-byte little-endian header size, JSON header, raw bytes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from scope_jax import sharding as shd
from scope_jax.models.model import ModelConfig, Transformer

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
# Tensors some checkpoints carry that are not parameters of the model (old non-persistent RoPE
# buffers); transformers skips them too.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
    """A checkpoint does not match the model its config.json describes."""


# ----------------------------------------------------------------------------------------------
# name mapping


def hf_name(path: tuple[Any, ...]) -> tuple[str, bool]:
    """Maps an NNX parameter path to (Hugging Face tensor name, transposed?).

    Kernels are stored [in, out] here and [out, in] (torch Linear.weight) in the checkpoint.
    e.g. ('layers', 0, 'self_attn', 'q_proj', 'kernel') -> ('model.layers.0.self_attn.q_proj.weight', True)
    """
    parts = [str(p) for p in path]
    if parts == ["lm_head"]:
        return "lm_head.weight", True
    if parts == ["embed_tokens"]:
        return "model.embed_tokens.weight", False
    transposed = parts[-1] == "kernel"
    if transposed:
        parts[-1] = "weight"
    return "model." + ".".join(parts), transposed


def _param_items(state: nnx.State) -> list[tuple[tuple[Any, ...], nnx.Variable]]:
    return [(tuple(p), v) for p, v in nnx.to_flat_state(state)]


# ----------------------------------------------------------------------------------------------
# safetensors IO


def _read_header(file: str) -> tuple[dict[str, Any], int]:
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{file}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def _tensor_views(file: str) -> dict[str, np.ndarray]:
    """Memory-mapped, zero-copy numpy views of every tensor in one safetensors file."""
    header, start = _read_header(file)
    mm = np.memmap(file, dtype=np.uint8, mode="r")
    views = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']}")
        a, b = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        want = int(np.prod(info["shape"], dtype=np.int64)) * dtype.itemsize
        if b - a != want or not 0 <= a <= b:
            raise CheckpointError(f"{file}: tensor {name!r} has data offsets [{a}, {b}) for "
                                  f"{want} bytes of {info['dtype']} {info['shape']} (corrupt header)")
        if start + b > mm.size:  # a copy or download that stopped early
            raise CheckpointError(f"{file}: tensor {name!r} ends at byte {start + b} but the file "
                                  f"has {mm.size} bytes (truncated file)")
        views[name] = mm[start + a:start + b].view(dtype).reshape(info["shape"])
    return views


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory (from the index json when present)."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.exists(os.path.join(path, name)):
                raise CheckpointError(f"{index} lists {name}, which does not exist in {path}")
        return [os.path.join(path, name) for name in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path} (.bin checkpoints are not read)")
    return [os.path.join(path, f) for f in files]


def read_tensors(path: str) -> dict[str, tuple[np.ndarray, str]]:
    """name -> (memory-mapped numpy view, file it lives in), over all files of a checkpoint."""
    out: dict[str, tuple[np.ndarray, str]] = {}
    for file in checkpoint_files(path):
        for name, view in _tensor_views(file).items():
            if name in out:
                raise CheckpointError(f"tensor {name!r} appears in both {out[name][1]} and {file}")
            out[name] = (view, file)
    return out


def _write_safetensors(file: str, specs: list[tuple[str, tuple[int, ...], np.dtype]],
                       arrays: Iterator[np.ndarray]) -> None:
    """Writes tensors (name, shape, dtype) whose data ``arrays`` yields one at a time, in order."""
    header, offset = {}, 0
    for name, shape, dtype in specs:
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for (name, shape, dtype), arr in zip(specs, arrays, strict=True):
            if arr.shape != tuple(shape) or arr.dtype != dtype:
                raise AssertionError(f"{name}: got {arr.shape} {arr.dtype}, header says {shape} {dtype}")
            f.write(np.ascontiguousarray(arr).tobytes())


# ----------------------------------------------------------------------------------------------
# load / save


def _abstract_model(cfg: ModelConfig, dtype, param_dtype, **kwargs) -> Transformer:
    """The model's skeleton: parameters are ShapeDtypeStructs, nothing is allocated."""
    return nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, param_dtype=param_dtype,
                                              rngs=nnx.Rngs(0), **kwargs))


def _place(host: np.ndarray, shape, dtype, sharding) -> jax.Array:
    """Builds a jax.Array on ``sharding``, reading only each addressable shard from ``host``."""
    if sharding is None:
        return jnp.asarray(np.asarray(host, dtype=dtype))
    return jax.make_array_from_callback(
        tuple(shape), sharding, lambda idx: np.asarray(host[idx], dtype=dtype))


def load_hf(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None, mesh=None,
            rules=None, **model_kwargs) -> Transformer:
    """Loads a Llama / Qwen2 / Qwen3 Hugging Face checkpoint directory.

    Args:
      path: directory with config.json and model.safetensors, or several safetensors files
        (with or without model.safetensors.index.json).
      dtype: compute dtype of the returned model.
      param_dtype: parameter storage dtype (default: ``dtype``); checkpoint tensors are cast.
      mesh: a jax Mesh (e.g. scope_jax.sharding.make_mesh): each parameter is created directly
        on the NamedSharding given by its logical axes and ``rules``. None: default device.
      rules: logical-axis rules (default scope_jax.sharding.DEFAULT_RULES).
      **model_kwargs: passed to Transformer (remat, attention_chunk).

    Returns:
      Transformer whose __call__ maps int32 [B, T] ids to float32 [B, T, V] logits.

    Raises:
      NotImplementedError naming the architecture / feature the config needs.
      CheckpointError naming the tensor (and file) when one is missing, unexpected or of the
        wrong shape.
    """
    path = os.fspath(path)
    cfg = ModelConfig.from_pretrained(path)
    param_dtype = dtype if param_dtype is None else param_dtype
    model = _abstract_model(cfg, dtype, param_dtype, rules=rules, **model_kwargs)
    graphdef, state = nnx.split(model)
    tensors = read_tensors(path)

    expected = {}
    for p, var in _param_items(state):
        expected[hf_name(p)[0]] = (p, var)
    ignorable = {n for n in tensors if _IGNORED.search(n)}
    if cfg.tie_word_embeddings:  # a tied lm_head.weight duplicates the embedding; unused
        ignorable.add("lm_head.weight")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(
            f"{path}: missing tensor {missing[0]!r} ({len(missing)} missing in all: "
            f"{missing[:8]}{' ...' if len(missing) > 8 else ''})")
    unexpected = sorted(set(tensors) - set(expected) - ignorable)
    if unexpected:
        raise CheckpointError(
            f"{path}: unexpected tensor {unexpected[0]!r} in {tensors[unexpected[0]][1]} "
            f"({len(unexpected)} unexpected in all: {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}); config.json describes {cfg}")

    for name, (p, var) in expected.items():
        host, file = tensors[name]
        _, transposed = hf_name(p)
        shape = var.get_value().shape
        want = tuple(reversed(shape)) if transposed else tuple(shape)
        if tuple(host.shape) != want:
            raise CheckpointError(
                f"{file}: tensor {name!r} has shape {tuple(host.shape)}, expected {want} "
                "from config.json")
        host = host.T if transposed else host
        sharding = None
        if mesh is not None:
            sharding = shd.logical_to_sharding(var.get_metadata()["logical_axes"], mesh, rules,
                                               shape=shape)
        var.set_value(_place(host, shape, param_dtype, sharding))
    return nnx.merge(graphdef, state)


def check_finite(model: Transformer, where: str = "model") -> None:
    """Raises CheckpointError naming the first parameter (by its Hugging Face tensor name) that
    holds NaN / inf, or, when all are finite, saying that the logits of a one-token prompt
    (bos, else id 0) are not: a usable model has neither."""
    for p, var in _param_items(nnx.state(model, nnx.Param)):
        x = np.asarray(jax.device_get(var.get_value()), dtype=np.float32)
        if not np.isfinite(x).all():
            raise CheckpointError(f"{where}: tensor {hf_name(p)[0]!r} holds {int((~np.isfinite(x)).sum())} "
                                  f"non-finite value(s) of {x.size}")
    bos = model.config.bos_token_id
    logits = model(jnp.asarray([[bos if bos is not None else 0]], jnp.int32))
    if not bool(jnp.isfinite(logits).all()):
        raise CheckpointError(f"{where}: every tensor is finite but the logits are not (overflow: "
                              f"max |weight| is too large for the compute dtype)")


def _dtype_name(dtype) -> str:
    return np.dtype(dtype).name


def _to_host(x: jax.Array) -> np.ndarray:
    """Full value of a (possibly multi-host sharded) array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_hf(model: Transformer, path: str | os.PathLike, *, max_shard_bytes: int = 4 << 30,
            copy_files_from: str | os.PathLike | None = None) -> str:
    """Writes ``model`` as a Hugging Face checkpoint that AutoModelForCausalLM loads.

    Writes config.json and model.safetensors, or model-0000i-of-0000n.safetensors files of at
    most ``max_shard_bytes`` each plus model.safetensors.index.json. Tensors are fetched and
    written one at a time (all processes take part in the gather; process 0 writes).

    Args:
      model: the Transformer (parameters in any dtype / sharding; stored in their dtype).
      path: output directory (created).
      copy_files_from: optional source checkpoint directory whose tokenizer / generation
        files (everything except config.json and weights) are copied alongside.
    Returns:
      ``path``.
    """
    path = os.fspath(path)
    items = [(hf_name(p), v) for p, v in _param_items(nnx.state(model, nnx.Param))]
    specs = []
    for (name, transposed), v in items:
        shape = tuple(v.get_value().shape)
        specs.append((name, tuple(reversed(shape)) if transposed else shape,
                      np.dtype(v.get_value().dtype)))
    groups: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dt) in enumerate(specs):
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += nbytes
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)
        dtype_name = _dtype_name(model.param_dtype)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(model.config.to_hf(dtype=dtype_name), f, indent=2)

    def arrays(idx):
        for i in idx:
            (_, transposed), v = items[i]
            host = _to_host(v.get_value())
            yield host.T if transposed else host

    n = len(groups)
    names = ["model.safetensors"] if n == 1 else [
        f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    for idx, fname in zip(groups, names):
        if writer:
            _write_safetensors(os.path.join(path, fname), [specs[i] for i in idx], arrays(idx))
        else:
            for _ in arrays(idx):  # take part in the cross-host gathers
                pass
    if writer and n > 1:
        total = sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for _, s, d in specs)
        weight_map = {specs[i][0]: fname for idx, fname in zip(groups, names) for i in idx}
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if writer and copy_files_from is not None:
        src = os.fspath(copy_files_from)
        for f in os.listdir(src):
            full = os.path.join(src, f)
            if (os.path.isfile(full) and f != "config.json" and f != INDEX_FILE
                    and not f.endswith((".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5"))):
                shutil.copy2(full, os.path.join(path, f))
    return path


# --------------------------------------------------------------------------------------------
# Names and shapes from a run config (the trainer, the dry run and tools/scale_check.py).
# --------------------------------------------------------------------------------------------

# config.model.dtype / teacher_dtype / param_dtype and the tools' --dtype flags name one of these.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_named(name: str):
    """The jnp dtype a config or a --dtype flag names ("float32" or "bfloat16")."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def hf_config(cfg, role: str) -> dict:
    """config.json of the checkpoint directory cfg.<role> ("student" or "teacher"), or the
    architecture written in cfg.arch.<role> (configs that describe a model without weights)."""
    path = os.path.join(cfg[role], "config.json") if cfg[role] else ""
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    if "arch" in cfg and role in cfg.arch:
        return cfg.arch[role].to_dict()
    raise FileNotFoundError(f"no {path or role + ' path'} and no config.arch.{role} to build shapes from")


def abstract_model(cfg, role: str, mesh, num_layers: int | None = None):
    """(graphdef, params as sharded ShapeDtypeStructs, param shardings) of cfg.<role>'s
    architecture (hf_config; num_layers overrides the depth) at the run's dtypes, built
    without weights."""
    m = cfg.model
    arch = hf_config(cfg, role)
    if num_layers is not None:
        arch = dict(arch, num_hidden_layers=int(num_layers))
    mc = ModelConfig.from_hf(arch, source=f"config.arch.{role}")
    compute = dtype_named(m.dtype if role == "student" else m.teacher_dtype)
    pdt = dtype_named(m.param_dtype) if role == "student" else compute
    abstract = _abstract_model(mc, compute, pdt, remat=m.remat_policy if role == "student" else False)
    graphdef, state = nnx.split(abstract)
    params = nnx.to_pure_dict(state)
    shardings = nnx.to_pure_dict(shd.model_shardings(abstract, mesh))
    params = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), params, shardings)
    return graphdef, params, shardings
