"""Export a whisper_scratch checkpoint to other Whisper implementations: one module per target.

- openai.py: openai-whisper's `.pt` (`whisper.load_model(path)`);
- hf.py: a Hugging Face transformers folder, with a tokenizer and generation config for our
  vocabulary (not Whisper's tiktoken one, see tokenizer.py);
- ct2.py: CTranslate2, run on the HF export, in the padded vocabulary layout faster-whisper needs;
- ggml.py: the GGML file whisper.cpp loads (our specials moved to the ids whisper.cpp derives);
- __main__.py: the command line, `python -m whisper_scratch.export --checkpoint A --output B --to ct2`.

Every export's logits match ours (tests/test_export.py). transformers, tokenizers, ctranslate2
and openai-whisper are imported only by the functions that need them (test dependencies, see
requirements-dev.txt), and training never imports this package (warm start: warmstart.py).
This module re-exports the public functions; the command line's `main`, `export` and
`ExportOptions` are loaded on first use, so that `python -m` runs __main__.py only once.
"""
from .ct2 import CT2_QUANTIZATIONS, FW_VOCAB, export_ct2, fw_extra_tokens, fw_weights, pinned_row
from .ggml import GGML_TYPES, GGML_VOCAB, export_ggml, ggml_ids, ggml_vocab, whisper_cpp_ids
from .hf import (export_hf, hf_config, hf_generation_config, hf_key_map, hf_model, hf_state_dict, hf_tokenizer,
                 special_ids, suppress_ids)
from .openai import OPENAI_DIMS, export_openai, load_openai_model, openai_state_dict, to_openai_checkpoint

_COMMAND_LINE = ("ExportOptions", "TARGETS", "export", "main")

__all__ = ["CT2_QUANTIZATIONS", "FW_VOCAB", "GGML_TYPES", "GGML_VOCAB", "OPENAI_DIMS", "export_ct2", "export_ggml",
           "export_hf", "export_openai", "ggml_ids", "ggml_vocab", "whisper_cpp_ids",
           "fw_extra_tokens", "fw_weights", "hf_config", "hf_generation_config", "hf_key_map", "hf_model",
           "hf_state_dict", "hf_tokenizer", "load_openai_model", "openai_state_dict", "pinned_row",
           "special_ids", "suppress_ids", "to_openai_checkpoint", *_COMMAND_LINE]


def __getattr__(name: str):
    if name in _COMMAND_LINE:
        from . import __main__ as command_line

        return getattr(command_line, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
