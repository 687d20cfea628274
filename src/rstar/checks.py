"""Checks of a command's inputs made before any work starts, so that a bad input is one line
(`rstar CMD: error: ...`, exit 2) rather than a traceback from deep inside a library, and a run
directory is not created for a run that cannot start.

- `check_models`: --policy/--ppm name a model directory or a hub id that can be had (the local
  Hugging Face cache, or a reachable hub that knows it; offline, no 48 s of retries), and
  `model.device=cuda` has a CUDA build of torch with a GPU.
- argparse types for numbers: `nonneg_int`, `positive_int`, `seconds`.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from rstar import RstarError

# What the hub accepts as a repo id: NAME or OWNER/NAME.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
MAX_SECONDS = 24 * 3600.0


def nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def positive_int(text: str) -> int:
    value = nonneg_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a number >= 1, got 0")
    return value


def seconds(text: str) -> float:
    """A time limit: finite, above 0, at most a day."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not math.isfinite(value) or not 0 < value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"expected seconds in (0, {MAX_SECONDS:g}], got {text}")
    return value


def _offline() -> bool:
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    return False


def _reachable(url: str, timeout_s: float = 3.0) -> bool:
    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname or "", u.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def check_model_source(name: str, flag: str) -> None:
    """`name` is a model directory (with config.json) or a hub id that can be loaded now."""
    if not name or name.startswith(("http://", "https://")):
        return
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RstarError(f"{flag} {name}: a file, expected a model directory (with config.json)")
        if not (path / "config.json").is_file():
            raise RstarError(f"{flag} {name}: a directory without config.json, so not a model directory")
        return
    path_like = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or name in (".", "..")
    if path_like or not _HUB_ID.match(name):
        raise RstarError(f"{flag} {name}: no such model directory (and not a hub id like OWNER/NAME)")
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:
        return
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return  # in the local cache
    how = (
        f"pass a local model directory, or download it where there is network "
        f"(`hf download {name}`) into the Hugging Face cache"
    )
    if _offline():
        raise RstarError(f"{flag} {name}: not a local directory and not in the Hugging Face cache ({how})")
    endpoint = constants.ENDPOINT
    if not _reachable(endpoint):
        raise RstarError(
            f"{flag} {name}: not a local directory, not in the Hugging Face cache, and {endpoint} cannot "
            f"be reached ({how}; set HF_HUB_OFFLINE=1 to skip the hub)"
        )
    try:
        from huggingface_hub import model_info
        from huggingface_hub.utils import RepositoryNotFoundError
    except ImportError:
        return
    try:
        model_info(name, timeout=10)
    except RepositoryNotFoundError:
        raise RstarError(f"{flag} {name}: no such model on {endpoint} and no such local directory") from None
    except Exception:  # gated, rate-limited, ...: let the loader say what it says
        return


def check_device(device: str) -> None:
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "no GPU is visible"
        raise RstarError(f"model.device={device}: {why}; use model.device=auto or cpu")


def check_models(model, policy_flag: str = "--policy", ppm_flag: str = "--ppm") -> None:
    """The models a command will load (`rstar.config.ModelConfig`), checked before any work."""
    if model.backend in ("hf", "vllm") and model.policy:
        check_model_source(model.policy, policy_flag)
    if model.ppm:
        check_model_source(model.ppm, ppm_flag)
    if model.backend == "hf":
        check_device(model.device)
