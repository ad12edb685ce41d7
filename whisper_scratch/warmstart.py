"""Warm-start our model from an openai-whisper checkpoint (training's `--init-from`).

Its encoder, optionally its decoder, never its token embedding: our vocabulary is not Whisper's
(see tokenizer.py).

Needs torch only: training imports neither openai-whisper nor the export package.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from .model import ModelDimensions, Whisper


def _read_openai_checkpoint(path: Union[str, Path]) -> tuple:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: openai-whisper checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise ValueError(f"{path}: not an openai-whisper checkpoint (expected a dict with 'dims' and "
                         f"'model_state_dict')")
    return ckpt["dims"], ckpt["model_state_dict"]


def _check_same(path, theirs: dict, ours: ModelDimensions, names: tuple) -> None:
    bad = [f"{n} {theirs.get(n)} (ours {getattr(ours, n)})" for n in names if theirs.get(n) != getattr(ours, n)]
    if bad:
        raise ValueError(f"{path}: cannot warm-start, the shapes differ: {', '.join(bad)}; "
                         f"pick --whisper-size/--n-mels to match the checkpoint")


def init_from_openai(model: Whisper, path: Union[str, Path], transfer_decoder: bool = False) -> list:
    """Copy an openai-whisper checkpoint's encoder (and, with transfer_decoder, its decoder
    except the token embedding) into `model`, in place; returns the names of the copied tensors.

    Our vocabulary (char or BPE, see tokenizer.py) is not Whisper's, so the token embedding (which
    is also the output projection) always stays as initialised: a new decoder vocabulary. The
    CTC head, if any, stays random too. Positional tables are cut to our context lengths.
    """
    theirs, state = _read_openai_checkpoint(path)
    _check_same(path, theirs, model.dims, ("n_mels", "n_audio_state", "n_audio_head", "n_audio_layer"))
    prefixes = ["encoder."]
    if transfer_decoder:
        _check_same(path, theirs, model.dims, ("n_text_state", "n_text_head", "n_text_layer"))
        prefixes.append("decoder.")
    ours = model.state_dict()
    copied = []
    with torch.no_grad():
        for name, target in ours.items():
            if not name.startswith(tuple(prefixes)) or name == "decoder.token_embedding.weight":
                continue
            if name not in state:
                raise ValueError(f"{path}: has no tensor {name!r}; is it an openai-whisper checkpoint?")
            source = state[name]
            if name.endswith("positional_embedding"):
                if source.shape[0] < target.shape[0]:
                    raise ValueError(f"{path}: {name} has {source.shape[0]} positions, this model needs "
                                     f"{target.shape[0]}")
                source = source[: target.shape[0]]
            target.copy_(source.to(target.dtype))
            copied.append(name)
    return copied
