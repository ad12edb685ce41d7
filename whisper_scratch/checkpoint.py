"""Checkpoints: dims + tokenizer + weights (+ whatever the trainer adds: optimizer, sampler, RNG
states), primitives and tensors only, so they load with torch.load(weights_only=True) and describe
themselves."""
from __future__ import annotations

import contextlib
import os
import random
import tempfile
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .model import ModelDimensions, Whisper
from .tokenizer import Tokenizer, tokenizer_from_dict

FORMAT = "whisper_scratch"
VERSION = 1


def atomic_save(obj, path: Union[str, os.PathLike]) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`, so a
    crash or Ctrl-C mid-write never leaves a truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def save_checkpoint(path, model: Whisper, tokenizer: Tokenizer, **extra) -> None:
    """Write {format, version, dims, tokenizer, model, **extra} atomically."""
    ckpt = {"format": FORMAT, "version": VERSION, "dims": model.dims.to_dict(),
            "tokenizer": tokenizer.to_dict(), "model": model.state_dict(), **extra}
    atomic_save(ckpt, path)


def load_checkpoint(path, map_location: Union[str, torch.device] = "cpu") -> dict:
    """Read a checkpoint written by save_checkpoint; clear errors for missing or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not a whisper_scratch checkpoint (expected a dict with format={FORMAT!r})")
    if ckpt.get("version", 0) > VERSION:
        raise ValueError(f"{path}: checkpoint version {ckpt['version']} is newer than this code ({VERSION})")
    return ckpt


def load_model(path, device: Union[str, torch.device] = "cpu",
               ckpt: Optional[dict] = None) -> tuple:
    """Rebuild (model, tokenizer, checkpoint) from the dims and tokenizer the checkpoint carries."""
    ckpt = ckpt if ckpt is not None else load_checkpoint(path, device)
    dims = ModelDimensions.from_dict(ckpt["dims"])
    with torch.device("meta"):  # skip the random init: every weight is overwritten next
        model = Whisper(dims)
    # assign=True adopts the saved tensors; every buffer is persistent (the encoder's sinusoid table
    # is openai's `positional_embedding` key), so nothing on the meta device is left behind
    model.load_state_dict(ckpt["model"], strict=True, assign=True)
    model = model.to(device).eval()
    return model, tokenizer_from_dict(ckpt["tokenizer"]), ckpt


def rng_state() -> dict:
    """Python, numpy and torch (and CUDA) RNG states as tensors and primitives, so a resumed run
    draws the same augmentation and dropout-free randomness as an uninterrupted one."""
    np_state = np.random.get_state()
    state = {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
             "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def precision(dtype: Optional[str], device: Union[str, torch.device]):
    """The context to run a loaded model in: autocast for float16/bfloat16 (LayerNorm and the
    logits stay fp32), nothing for float32; dtype None = float16 on cuda, else float32."""
    device = str(device)
    name = dtype or ("float16" if device.startswith("cuda") else "float32")
    if name == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, name))
