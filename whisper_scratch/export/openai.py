"""Export to openai-whisper: a `.pt` file that `whisper.load_model(path)` reads.

Our state-dict keys are openai-whisper's, so the file is the weights (minus the CTC head, which
openai-whisper has no place for) plus the 10 dims.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

from ..checkpoint import atomic_save
from ..model import Whisper

OPENAI_DIMS = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer",
               "n_vocab", "n_text_ctx", "n_text_state", "n_text_head", "n_text_layer")


def openai_state_dict(model: Whisper) -> dict:
    """Our weights under openai-whisper's keys: they are the same keys, minus the CTC head."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("ctc_head.")}


def to_openai_checkpoint(model: Whisper) -> dict:
    """{"dims", "model_state_dict"}: what `whisper.load_model(path)` reads."""
    dims = {k: getattr(model.dims, k) for k in OPENAI_DIMS}
    return {"dims": dims, "model_state_dict": openai_state_dict(model)}


def export_openai(model: Whisper, path: Union[str, Path]) -> Path:
    atomic_save(to_openai_checkpoint(model), path)
    return Path(path)


def load_openai_model(path: Union[str, Path]):
    """An exported `.pt` loaded by openai-whisper's own `whisper.load_model` (weights_only,
    load_state_dict strict: every key must match)."""
    import whisper

    path = Path(path)
    if not path.is_file():  # load_model would take a missing path for a model name to download
        raise FileNotFoundError(f"{path}: openai-whisper checkpoint not found")
    return whisper.load_model(str(path), device="cpu").eval()
