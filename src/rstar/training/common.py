"""What the two trainers (`training/sft.py`, `training/reward.py`) share, without torch, so that
`rstar train --help` stays light: reading the data files, the held-out split by problem, the
batch plan and the HF Trainer arguments built from a `TrainConfig`, and the metrics file.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rstar import RstarError, steps

if TYPE_CHECKING:
    from rstar.config import TrainConfig


# --- data --------------------------------------------------------------------------------

Records = list[dict] | str | Path


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


FIELD_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "str": (_is_str, "a string"),
    "number": (_is_number, "a finite number"),
}


def load_records(
    data: Records,
    fields: dict[str, str],
    what: str = "data",
    check: Callable[[dict], str | None] | None = None,
) -> list[dict]:
    """Records from a list, a JSON array file (the authors' format) or a JSONL file, checked.

    `fields` maps each required field to "str" or "number"; `check`, if given, returns an
    error message for a record that has its fields but is still wrong. A bad record raises
    RstarError naming the file, the record (array index, or line number for JSONL) and the
    field, so that one broken line in a 500k-pair file is found at once, not mid-training.
    Extra fields (`pos_count`, `neg_count`, ...) are kept and ignored.
    """
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise RstarError(f"{path}: no such file")
        text = path.read_text(encoding="utf-8")
        records: list[tuple[str, Any]] = []
        stripped = text.lstrip()
        if path.suffix != ".jsonl" and stripped.startswith("["):
            try:
                array = json.loads(text)
            except json.JSONDecodeError as e:
                raise RstarError(f"{path}: not valid JSON: {e}") from e
            records = [(f"record {i}", r) for i, r in enumerate(array)]
        else:  # JSONL: one record per line
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    records.append((f"line {n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise RstarError(f"{path}: line {n}: not valid JSON: {e}") from e
        where = str(path)
    else:
        records = [(f"record {i}", r) for i, r in enumerate(data)]
        where = what
    out = []
    for loc, rec in records:
        if not isinstance(rec, dict):
            raise RstarError(f"{where}: {loc}: expected an object, got {type(rec).__name__}")
        for name, kind in fields.items():
            ok, expected = FIELD_CHECKS[kind]
            if name not in rec:
                raise RstarError(f"{where}: {loc}: field {name!r} missing")
            if not ok(rec[name]):
                raise RstarError(f"{where}: {loc}: field {name!r} must be {expected}, got {rec[name]!r:.80}")
        problem = check(rec) if check is not None else None
        if problem:
            raise RstarError(f"{where}: {loc}: {problem}")
        out.append(rec)
    if not out:
        raise RstarError(f"{where}: no records")
    return out


def problem_key(prompt: str) -> str:
    """The problem a record belongs to: its prompt up to the assistant header.

    Pairs (and SFT trajectories) of one problem share this key, whether the record's prompt
    is the bare question (the authors' pair format) or the question plus earlier steps.
    """
    return prompt.split("\n" + steps.ASSISTANT_HEADER, 1)[0]


def split_held_out(
    records: list[dict], fraction: float, seed: int, key: Callable[[dict], str]
) -> tuple[list[dict], list[dict]]:
    """(train, held_out): whole problems are held out, a `fraction` of the records' problems.

    Splitting by problem, not by record, keeps pairs that share a problem (and so a prefix)
    from sitting on both sides, which would inflate held-out accuracy. The split depends only
    on the problem keys and `seed`. At least one problem stays for training; with
    `fraction > 0` and two or more problems, at least one is held out.
    """
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(key(r), []).append(r)
    names = sorted(groups)
    random.Random(seed).shuffle(names)
    n_eval = 0
    if fraction > 0 and len(names) >= 2:
        n_eval = min(len(names) - 1, max(1, round(len(names) * fraction)))
    held = set(names[:n_eval])
    train = [r for r in records if key(r) not in held]
    evals = [r for r in records if key(r) in held]
    return train, evals


# --- trainer arguments -------------------------------------------------------------------


def world_size() -> int:
    """Processes in this run: set by `accelerate launch` / torchrun, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def batch_plan(global_batch: int, micro_batch: int, world: int) -> tuple[int, int]:
    """(per-device batch, gradient-accumulation steps) whose product with `world` makes up the
    global batch (rounded down to a multiple of per-device batch x world, never below one
    micro batch per device)."""
    per_device = max(1, min(micro_batch, global_batch // max(world, 1)))
    accum = max(1, global_batch // (per_device * max(world, 1)))
    return per_device, accum


def use_bf16(setting: str) -> bool:
    """TrainConfig.bf16: "auto" = bf16 only on a CUDA device that supports it (CPU: fp32)."""
    import torch

    s = str(setting).strip().lower()
    if s == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if s in ("true", "1", "yes"):
        return True
    if s in ("false", "0", "no"):
        return False
    raise RstarError(f"bf16={setting!r}: expected auto | true | false")


def select_device(device: str = "auto") -> str:
    """Apply `model.device` to a training run, before the Trainer touches CUDA: "auto" = the
    Trainer's choice (CUDA when there is one), "cpu" = CPU even on a GPU machine, "cuda" = the
    first GPU, "cuda:N" = GPU N only (through CUDA_VISIBLE_DEVICES, so it must be set before
    CUDA starts; under `accelerate launch` each process's device is accelerate's, and this
    setting is ignored). Returns the device the run will use, for the provenance file."""
    import torch

    d = str(device or "auto").strip().lower()
    if d == "cpu":
        return "cpu"
    if d not in ("auto", "cuda") and not d.startswith("cuda:"):
        raise RstarError(f"model.device={device!r}: expected auto | cpu | cuda | cuda:N")
    if d.startswith("cuda:") and world_size() == 1:
        index = d.split(":", 1)[1]
        if not index.isdigit():
            raise RstarError(f"model.device={device!r}: expected cuda:N with N a GPU number")
        if torch.cuda.is_initialized():
            if torch.cuda.current_device() != int(index):
                raise RstarError(
                    f"model.device={device}: CUDA already started on another GPU in this process"
                )
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = index
    if d != "auto" and not torch.cuda.is_available():
        raise RstarError(f"model.device={device}: no CUDA device is available")
    return "cuda" if d == "auto" and torch.cuda.is_available() else ("cpu" if d == "auto" else d)


def trainer_arguments(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    max_steps: int | None = None,
    has_eval: bool = False,
    device: str = "auto",
    save_steps: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments of `TrainingArguments` (and TRL's configs, its subclasses) from a
    TrainConfig. Every default that TRL changes from the HF Trainer's is set explicitly here,
    so that SFT and reward training run under the same rules. `device` is `select_device`'s
    result; `save_steps` writes a resumable checkpoint (`out_dir/checkpoint-STEP`) that often."""
    import torch

    per_device, accum = batch_plan(cfg.batch_size, cfg.micro_batch_size, world_size())
    on_gpu = torch.cuda.is_available() and device != "cpu"
    saving = {"save_strategy": "no"}  # the final model is saved once, by the caller
    if save_steps:
        saving = {"save_strategy": "steps", "save_steps": save_steps}
    return dict(
        output_dir=str(out_dir),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=max_steps if max_steps is not None else -1,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        gradient_accumulation_steps=accum,
        lr_scheduler_type="cosine",
        # transformers 5 reads a float in [0, 1) as a share of the total steps.
        warmup_steps=min(max(float(cfg.warmup_ratio), 0.0), 0.999),
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=use_bf16(cfg.bf16),
        # TRL turns activation (gradient) checkpointing on by default; it saves memory on 7B
        # models and only slows the tiny CPU models down.
        **{_checkpointing_flag(): on_gpu},
        logging_steps=cfg.logging_steps,
        train_sampling_strategy=cfg.sampling,
        logging_first_step=True,
        use_cpu=device == "cpu",
        **saving,
        eval_strategy="no",  # held-out metrics are computed once, after training
        report_to="none",
        disable_tqdm=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=on_gpu,
        do_eval=has_eval,
    )


def _checkpointing_flag() -> str:
    """transformers 5.x renamed `gradient_checkpointing` to `activation_checkpointing`."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def write_metrics(out_dir: str | Path, metrics: dict) -> Path:
    path = Path(out_dir) / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return path


# --- provenance --------------------------------------------------------------------------

PROVENANCE_FILE = "rstar_training.json"


def file_sha256(path: str | Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_provenance(data: Records, records: list[dict]) -> dict[str, Any]:
    """Where the training data came from: the file's absolute path and sha256, or for records
    passed in memory the sha256 of their JSONL serialisation (sorted keys), and the count."""
    import hashlib

    if isinstance(data, (str, Path)):
        return {"path": str(Path(data).resolve()), "sha256": file_sha256(data), "records": len(records)}
    blob = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records)
    return {"path": None, "sha256": hashlib.sha256(blob.encode()).hexdigest(), "records": len(records)}


def package_versions() -> dict[str, str]:
    import platform
    from importlib import metadata

    from rstar import __version__

    out = {"rstar": __version__, "python": platform.python_version()}
    for dist in ("torch", "transformers", "trl", "accelerate", "datasets"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_provenance(
    out_dir: str | Path,
    *,
    kind: str,
    base_model: str | Path,
    data: dict[str, Any],
    cfg: TrainConfig,
    metrics: dict[str, Any],
    device: str,
    max_steps: int | None = None,
    resumed_from: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """`out_dir/rstar_training.json`: how the model in `out_dir` was made (base model, data
    file and its sha256, the training config, device, package versions, metrics, command)."""
    import dataclasses
    import sys
    import time

    base = str(base_model)
    if Path(base).exists():
        base = str(Path(base).resolve())
    doc = {
        "kind": kind,
        "base_model": base,
        "data": data,
        "config": dataclasses.asdict(cfg),
        "max_steps": max_steps,
        "resumed_from_checkpoint": resumed_from,
        "device": device,
        "world_size": world_size(),
        "versions": package_versions(),
        "metrics": metrics,
        "argv": sys.argv,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    path = Path(out_dir) / PROVENANCE_FILE
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path


# The paper's learning rate (7e-6) is for a 7B model; a model this small barely moves at it.
SMALL_MODEL_PARAMS = 100_000_000
SMALL_MODEL_LR = 1e-4
_warned_lr: set[tuple[str, float]] = set()


def warn_small_model_lr(n_params: int, cfg: TrainConfig, section: str, out: Any = None) -> bool:
    """Warn once on stderr when a model under ~100M parameters is trained at a learning rate
    meant for billions (below 1e-4, e.g. the paper's 7e-6). Returns whether it warned."""
    import sys

    if n_params >= SMALL_MODEL_PARAMS or cfg.learning_rate >= SMALL_MODEL_LR:
        return False
    key = (section, float(cfg.learning_rate))
    if key in _warned_lr:
        return False
    _warned_lr.add(key)
    print(
        f"rstar train: warning: learning rate {cfg.learning_rate:g} is the paper's setting for a 7B model; "
        f"this model has {n_params / 1e6:.1f}M parameters and will barely change at it. Pass --lr "
        f"(e.g. --lr 1e-3 for the tiny policy; = --set {section}.learning_rate=...).",
        file=out or sys.stderr,
        flush=True,
    )
    return True


def save_trained(trainer, tokenizer, out: Path, metrics: dict[str, Any], **provenance: Any) -> None:
    """Write what a training run leaves beside its weights (the model itself, its tokenizer,
    metrics.json and rstar_training.json; `provenance` are write_provenance's fields), from the
    main process only."""
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(out))
        write_metrics(out, metrics)
        write_provenance(out, metrics=metrics, **provenance)
