"""Llama / Qwen2 / Qwen3 decoder in Flax NNX and its Hugging Face checkpoint IO.

    from scope_jax.models import ModelConfig, Transformer, Cache, load_hf, save_hf
"""

from scope_jax.models.hf import DTYPES, CheckpointError, abstract_model, dtype_named, hf_config, load_hf, save_hf
from scope_jax.models.model import (CACHE_LOGICAL_AXES, DECODE_CACHE_LOGICAL_AXES, Cache, DecodeCache,
                                    ModelConfig, PageContext, PagedBatch, Transformer)

__all__ = ["CACHE_LOGICAL_AXES", "DECODE_CACHE_LOGICAL_AXES", "DTYPES", "Cache", "CheckpointError", "DecodeCache",
           "ModelConfig", "PageContext", "PagedBatch", "Transformer", "abstract_model", "dtype_named", "hf_config",
           "load_hf", "save_hf"]
