"""Policy and reward backends behind two small interfaces (see `base`).

Backends are imported lazily: `rstar.models.hf` pulls in torch and transformers, vLLM is an
install extra, and the OpenAI-compatible client needs neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rstar import RstarError
from rstar.models.base import Completion, GenRequest, Policy, RewardModel

if TYPE_CHECKING:
    from rstar.config import ModelConfig

__all__ = [
    "Completion",
    "GenRequest",
    "Policy",
    "RewardModel",
    "load_policy",
    "load_reward",
    "set_cpu_threads",
]


def set_cpu_threads(cfg: ModelConfig) -> None:
    """Apply `model.cpu_threads` (a process-wide torch setting) when it is set."""
    if cfg.cpu_threads > 0:
        import torch

        torch.set_num_threads(cfg.cpu_threads)


def load_policy(cfg: ModelConfig) -> Policy:
    set_cpu_threads(cfg)
    if not cfg.policy:
        raise RstarError(
            "no policy given: pass --policy MODEL (an HF directory or hub name) or set model.policy"
        )
    if cfg.backend == "hf":
        from rstar.models.hf import HFPolicy

        return HFPolicy(
            cfg.policy,
            device=cfg.device,
            dtype=cfg.dtype,
            max_batch_size=cfg.max_batch_size,
            engine=cfg.engine,
            prefix_cache_mb=cfg.prefix_cache_mb,
        )
    if cfg.backend == "vllm":
        from rstar.models.vllm import VLLMPolicy

        return VLLMPolicy(cfg.policy, dtype=cfg.dtype)
    if cfg.backend == "openai":
        from rstar.models.openai import OpenAIPolicy

        return OpenAIPolicy(cfg.policy)
    raise RstarError(f"model.backend={cfg.backend!r}: expected hf | vllm | openai")


def load_reward(cfg: ModelConfig) -> RewardModel | None:
    if not cfg.ppm:
        return None
    set_cpu_threads(cfg)
    from rstar.models.ppm import load_reward_model

    return load_reward_model(
        cfg.ppm,
        device=cfg.device,
        dtype=cfg.dtype,
        max_batch_size=cfg.max_batch_size,
        engine=cfg.engine,
        prefix_cache_mb=cfg.prefix_cache_mb,
    )
