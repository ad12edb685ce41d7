"""Warm-start our model from another model's weights (training's `--init-from`).

The source is an openai-whisper checkpoint or one of ours (say, a model pretrained on Common Voice
clips of many languages and speakers, then fine-tuned on a small corpus). Its encoder is copied,
optionally its decoder. The token embedding and CTC head belong to a vocabulary: they are copied
only from one of ours whose tokenizer the new run adopts (`--init-decoder`: fine-tuning the whole
model on new data); otherwise the new run's vocabulary is its own (see tokenizer.py).

Needs torch only: training imports neither openai-whisper nor the export package.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from .checkpoint import FORMAT, check_version_and_keys, read_checkpoint_file
from .model import ModelDimensions, Whisper

# What the encoder hears and computes: every one must match for its weights to mean the same.
ENCODER_FIELDS = ("n_mels", "n_audio_state", "n_audio_head", "n_audio_layer", "feature_norm")
DECODER_FIELDS = ("n_text_state", "n_text_head", "n_text_layer")


def read_source(path: Union[str, Path]) -> tuple:
    """(dims dict, state dict, 'openai-whisper' or 'whisper_scratch', tokenizer dict or None) of a
    checkpoint to start from."""
    path = Path(path)
    ckpt = read_checkpoint_file(path)  # a file that is no checkpoint: a CheckpointError saying what it is
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT:
        ckpt = check_version_and_keys(path, ckpt)
        return ckpt["dims"], ckpt["model"], "whisper_scratch", ckpt["tokenizer"]
    if isinstance(ckpt, dict) and "dims" in ckpt and "model_state_dict" in ckpt:
        return {**ckpt["dims"], "feature_norm": "none"}, ckpt["model_state_dict"], "openai-whisper", None
    raise ValueError(f"{path}: neither an openai-whisper checkpoint (a dict with 'dims' and 'model_state_dict') "
                     f"nor a whisper_scratch one")


def _check_same(path, kind: str, theirs: dict, ours: ModelDimensions, names: tuple) -> None:
    bad = [f"{n} {theirs.get(n)} (ours {getattr(ours, n)})" for n in names if theirs.get(n) != getattr(ours, n)]
    if bad:
        raise ValueError(f"{path}: cannot warm-start from this {kind} model, it differs: {', '.join(bad)}; "
                         f"pick --whisper-size, --n-mels and --feature-norm to match it")


def warm_start(model: Whisper, path: Union[str, Path], transfer_decoder: bool = False,
               tokenizer: Optional[dict] = None, source: Optional[tuple] = None) -> list:
    """Copy a checkpoint's encoder (and, with transfer_decoder, its decoder except the token
    embedding) into `model`, in place; returns the names of the copied tensors.

    The token embedding (which is also the output projection) and the CTC head belong to the
    source's vocabulary: they are copied too when transfer_decoder is set and `tokenizer` (the new
    run's, as saved) is the source's own, and otherwise stay as initialised. Positional tables are
    cut to our context lengths. An encoder trained with another --feature-norm heard other inputs:
    refused. `source`: read_source(path), when the caller has already read it.
    """
    theirs, state, kind, their_tokenizer = source if source is not None else read_source(path)
    same_vocabulary = transfer_decoder and tokenizer is not None and tokenizer == their_tokenizer
    _check_same(path, kind, theirs, model.dims, ENCODER_FIELDS)
    prefixes = ["encoder."]
    if transfer_decoder:
        _check_same(path, kind, theirs, model.dims, DECODER_FIELDS)
        prefixes.append("decoder.")
    if same_vocabulary and model.dims.ctc and theirs.get("ctc"):
        prefixes.append("ctc_head.")
    copied = []
    with torch.no_grad():
        for name, target in model.state_dict().items():
            if not name.startswith(tuple(prefixes)) or (name == "decoder.token_embedding.weight" and not same_vocabulary):
                continue
            if name not in state:
                raise ValueError(f"{path}: has no tensor {name!r}; is it a Whisper model?")
            source = state[name]
            if name.endswith("positional_embedding"):
                if source.shape[0] < target.shape[0]:
                    raise ValueError(f"{path}: {name} has {source.shape[0]} positions, this model needs "
                                     f"{target.shape[0]}")
                source = source[: target.shape[0]]
            target.copy_(source.to(target.dtype))
            copied.append(name)
    return copied
