"""The export command line: a whisper_scratch checkpoint to openai-whisper, HF, CTranslate2 or whisper.cpp.

    python -m whisper_scratch.export --checkpoint best_model.pt --to openai --output model.pt
    python -m whisper_scratch.export --checkpoint best_model.pt --to hf     --output hf_model/
    python -m whisper_scratch.export --checkpoint best_model.pt --to ct2    --output ct2_model/ [--quantization int8] [--compact]
    python -m whisper_scratch.export --checkpoint best_model.pt --to ggml   --output ggml-model.bin [--ggml_type q8_0]

The auxiliary CTC head (`ctc_head.*`, present when the model was trained with --ctc-weight) has
no counterpart in any of them and is dropped, with a message.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..checkpoint import load_model
from ..config import option, output_problem, parse_options
from .ct2 import CT2_QUANTIZATIONS, export_ct2
from .ggml import GGML_TYPES, export_ggml
from .hf import export_hf
from .openai import export_openai, require_plain_log_mels

TARGETS = ("openai", "hf", "ct2", "ggml")


@dataclass(frozen=True)
class ExportOptions:
    """Export a whisper_scratch checkpoint to openai-whisper, Hugging Face, CTranslate2 or whisper.cpp (GGML)."""

    checkpoint: str = option(help="a whisper_scratch checkpoint (best_model.pt / last.pt)")
    output: str = option(help="output file (openai, ggml) or folder (hf, ct2)")
    to: str = option("openai", "target: openai (.pt file), hf (folder), ct2 (folder), ggml (whisper.cpp .bin file)",
                     choices=TARGETS)
    quantization: Optional[str] = option(None, "ct2 only: CTranslate2 weight type (default float32)",
                                         choices=CT2_QUANTIZATIONS)
    compact: bool = option(False, "ct2 only: keep our vocabulary size instead of faster-whisper's 51,865 "
                                  "(smaller and faster; for ctranslate2.models.Whisper, not faster-whisper)")
    ggml_type: Optional[str] = option(None, "ggml only: weight type f16 (default), q8_0, or f32 (whisper.cpp 1.8.2's "
                                            "CPU convolution needs f16 kernels: f32 files load but abort there)",
                                      choices=GGML_TYPES)
    overwrite: bool = option(False, "replace an existing output")

    def __post_init__(self):
        if self.to not in TARGETS:
            raise ValueError(f"--to must be one of {TARGETS}, got {self.to!r}")
        if self.to != "ct2" and self.quantization is not None:
            raise ValueError(f"--quantization {self.quantization} applies to --to ct2 only, not --to {self.to}")
        if self.to != "ct2" and self.compact:
            raise ValueError(f"--compact applies to --to ct2 only, not --to {self.to}")
        if self.to != "ggml" and self.ggml_type is not None:
            raise ValueError(f"--ggml_type {self.ggml_type} applies to --to ggml only, not --to {self.to}")


def _clear_output(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if out.is_dir():
        # only ever delete a folder that an export wrote (HF and CT2 folders hold config.json)
        if any(out.iterdir()) and not (out / "config.json").is_file():
            raise FileExistsError(f"{out} is a folder that does not look like an export (no config.json); "
                                  f"not deleting it, choose another --output")
        shutil.rmtree(out)


FOLDER_TARGETS = ("hf", "ct2")
NEEDS = {"hf": ("transformers", "tokenizers"), "ct2": ("ctranslate2", "transformers", "tokenizers")}  # import names


def check_output(out: Path, to: str) -> None:
    """A file target over a folder, a folder target over a file, or a path under a file: refused
    before anything is read or deleted."""
    if to in FOLDER_TARGETS and out.is_file():
        raise FileExistsError(f"--output {out} is a file; --to {to} writes a folder: choose another --output")
    if to not in FOLDER_TARGETS and out.is_dir():
        raise FileExistsError(f"--output {out} is a folder; --to {to} writes one file: give a file name")
    problem = output_problem("--output", out, "folder" if to in FOLDER_TARGETS else "file")
    if problem:  # a file on the way, a broken link, a folder nobody may write in
        raise FileExistsError(problem)


def check_packages(to: str) -> None:
    missing = [name for name in NEEDS.get(to, ()) if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"--to {to} needs {' and '.join(missing)}, not installed here: pip install "
                         f"{' '.join(missing)} (or pip install -r requirements-dev.txt)")


def export(opts: ExportOptions) -> Path:
    out = Path(opts.output)
    check_output(out, opts.to)
    check_packages(opts.to)
    model, tokenizer, _ = load_model(opts.checkpoint)
    try:
        require_plain_log_mels(model.dims)
    except ValueError as e:
        raise ValueError(f"{opts.checkpoint}: {e}") from None
    _clear_output(out, opts.overwrite)
    if model.dims.ctc:
        print(f"note: {opts.checkpoint} has a CTC head (ctc_head.*); {opts.to} has no place for it, it is "
              f"dropped (attention decoding is unchanged)", file=sys.stderr)
    if opts.to == "openai":
        return export_openai(model, out)
    if opts.to == "hf":
        return export_hf(model, tokenizer, out)
    if opts.to == "ggml":
        return export_ggml(model, tokenizer, out, opts.ggml_type or "f16")
    return export_ct2(model, tokenizer, out, opts.quantization or "float32", opts.compact)


def main(argv=None) -> None:
    opts = parse_options(ExportOptions, argv, prog="python -m whisper_scratch.export")
    try:
        out = export(opts)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out} ({opts.to})")


if __name__ == "__main__":
    main()
