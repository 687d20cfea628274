"""Training of the policy (SFT) and of the reward model (PPM, or the ORM/PQM baselines).

- `train_sft(data, base_model, out_dir, cfg)`: policy SFT on `{"query", "response"}`
  records, loss on the response only (`rstar.training.sft`, TRL's SFTTrainer).
- `train_reward(data, base_model, out_dir, cfg, kind="ppm")`: the reward model, initialised
  from the SFT policy; Bradley-Terry on preference pairs for "ppm"/"orm", MSE to Q for "pqm"
  (`rstar.training.reward`, TRL's RewardTrainer / the HF Trainer).

Both return their metrics and also write them to `OUT/metrics.json`. The command line is
`rstar train sft|ppm` (`rstar.training.cli`); multi-GPU runs go through accelerate
(`accelerate launch -m rstar.cli train ...`), which the HF Trainer picks up by itself.

What both trainers share (data files, held-out split, batch plan, Trainer arguments) is in
`rstar.training.common`, which imports no torch; the trainers themselves are imported only when
asked for, so that `rstar train --help` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rstar.training.common import load_records, split_held_out

if TYPE_CHECKING:
    from rstar.training.reward import train_reward
    from rstar.training.sft import train_sft

__all__ = ["load_records", "split_held_out", "train_reward", "train_sft"]


def __getattr__(name: str) -> Any:
    # The trainers import torch, transformers and TRL: load them only when asked for.
    if name == "train_sft":
        from rstar.training.sft import train_sft

        return train_sft
    if name == "train_reward":
        from rstar.training.reward import train_reward

        return train_reward
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
