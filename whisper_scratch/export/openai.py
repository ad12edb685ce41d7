"""Export to openai-whisper: a `.pt` file that `whisper.load_model(path)` reads.

Our state-dict keys are openai-whisper's, so the file is the weights (minus the CTC head, which
openai-whisper has no place for) plus the 10 dims. openai-whisper builds its tokenizer from its own
tiktoken files, not from the model, so it needs ours handed to it: `openai_tokenizer`.

    model = whisper.load_model("model.pt")
    with openai_tokenizer("best_model.pt"):
        text = whisper.transcribe(model, "a.wav", language="mn", without_timestamps=True)["text"]
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional, Union

from ..checkpoint import atomic_save, load_model
from ..model import ModelDimensions, Whisper
from ..tokenizer import Tokenizer

OPENAI_DIMS = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer",
               "n_vocab", "n_text_ctx", "n_text_state", "n_text_head", "n_text_layer")


def require_plain_log_mels(dims: ModelDimensions) -> None:
    """Every export target feeds its encoder plain log-mels: a model trained on per-utterance
    normalised ones (--feature-norm) would hear something else there."""
    if dims.feature_norm != "none":
        raise ValueError(f"this model normalises each utterance's log-mels (trained with --feature-norm "
                         f"{dims.feature_norm}); openai-whisper, transformers, CTranslate2 and whisper.cpp feed the "
                         f"encoder plain log-mels, so it cannot be exported to them (train with --feature-norm none)")


def openai_state_dict(model: Whisper) -> dict:
    """Our weights under openai-whisper's keys: they are the same keys, minus the CTC head."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("ctc_head.")}


def to_openai_checkpoint(model: Whisper) -> dict:
    """{"dims", "model_state_dict"}: what `whisper.load_model(path)` reads."""
    require_plain_log_mels(model.dims)
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


class OpenAITokenizerShim:
    """What openai-whisper's `transcribe` and `decode` read from its tiktoken tokenizer, with our
    ids. Only the without-timestamps path exists (our vocabulary has no timestamp tokens)."""

    def __init__(self, tokenizer: Tokenizer, language: Optional[str] = None):
        from .hf import suppress_ids  # hf.py imports this module

        self.tokenizer = tokenizer
        self.sot, self.eot, self.transcribe = tokenizer.sot, tokenizer.eot, tokenizer.transcribe
        self.translate = self.sot_lm = tokenizer.sot  # no such tokens here; both are suppressed anyway
        self.sot_prev, self.no_timestamps = tokenizer.startofprev, tokenizer.no_timestamps
        self.no_speech = None
        self.timestamp_begin = tokenizer.vocab_size  # no timestamp tokens
        self.language = language or tokenizer.languages[0]
        if self.language not in tokenizer.language_ids:
            raise ValueError(f"language {self.language!r} is not one of this model's {tokenizer.languages}")
        self.language_token = tokenizer.language_ids[self.language]
        self.sot_sequence = tuple(tokenizer.sot_sequence(self.language)[:3])
        self.sot_sequence_including_notimestamps = tuple(tokenizer.sot_sequence(self.language))
        # openai-whisper suppresses these where suppress_tokens holds -1 (its default): our specials
        self.non_speech_tokens = tuple(suppress_ids(tokenizer))
        self.encoding = self  # transcribe's word splitting reads tokenizer.encoding.decode

    def encode(self, text: str) -> list:
        return self.tokenizer.encode(text)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids if int(i) < self.eot])

    def decode_with_timestamps(self, ids) -> str:
        return self.decode(ids)


@contextlib.contextmanager
def openai_tokenizer(tokenizer: Union[Tokenizer, str, Path]):
    """Within the block, openai-whisper's `transcribe`, `decode` and `model.transcribe` use our
    tokenizer (or the one saved in a checkpoint path) instead of its tiktoken ones. Pass
    `without_timestamps=True` (our models predict no timestamp tokens) and the language."""
    import importlib

    if not isinstance(tokenizer, Tokenizer):
        tokenizer = load_model(tokenizer)[1]
    # by module path: the package attribute `whisper.transcribe` is the function, not the module
    modules = [importlib.import_module(f"whisper.{name}") for name in ("decoding", "transcribe")]
    originals = [m.get_tokenizer for m in modules]

    def ours(*args, language: Optional[str] = None, **kwargs):
        return OpenAITokenizerShim(tokenizer, language)

    for m in modules:
        m.get_tokenizer = ours
    try:
        yield
    finally:
        for m, original in zip(modules, originals):
            m.get_tokenizer = original
