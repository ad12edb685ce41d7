"""Transcribe audio with a whisper_scratch checkpoint, in four modes:

  python transcribe.py --model_path OUT/best_model.pt --mode single    --audio_path clip.mp3
  python transcribe.py --model_path ... --mode directory --audio_dir DIR --output_file out.txt
  python transcribe.py --model_path ... --mode batch     --audio_dir DIR --batch_size 16 --output_file out.txt
  python transcribe.py --model_path ... --mode evaluate  --audio_dir DIR --reference_file refs.tsv

directory: every audio file under DIR (recursive), one at a time, written as it goes.
batch: the same files decoded in batches sorted by duration (same results, much faster).
evaluate: batch-decodes the files a reference TSV names and prints WER/CER (see --help).
Audio longer than one chunk (default: the longest clip the model was trained on) is cut at pauses
by voice activity (silero-vad) and its chunks decoded in batches; --vad false decodes 30 s windows
one after another, each prompted with the text so far.
Every flag is also accepted with dashes (--model-path); the search flags are DecodingOptions'
and FallbackOptions' own fields. The search lives in whisper_scratch/decoding.py, files of any
length in longform.py, scoring in evaluation.py; this script only parses options and reads/writes.
"""
from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from whisper_scratch.audio import AUDIO_EXTENSIONS, AudioError, one_line_audio_warnings
from whisper_scratch.checkpoint import (CheckpointError, check_device, check_quantize, load_model, precision, quantize,
                                        quantize_option)
from whisper_scratch.config import DTYPE_ALIASES, canonical_dtype, option, output_problem, parse_options, require
from whisper_scratch import decoding as D
from whisper_scratch.decoding import DecodingOptions, FallbackOptions
from whisper_scratch.evaluation import decode_references, resolve_references
from whisper_scratch.longform import transcribe, transcribe_files
from whisper_scratch.vad import VadOptions, with_checkpoint_chunks
from whisper_scratch.metrics import error_rates, utterance_errors, worst
from whisper_scratch.writers import OUTPUT_FORMATS, write_result

MODES = ("single", "directory", "batch", "evaluate")


@dataclass(frozen=True)
class TranscribeOptions:
    """Transcribe audio files with a trained whisper_scratch model."""

    model_path: str = option(help="checkpoint written by train.py, e.g. OUT/best_model.pt")
    mode: str = option("single", "single | directory | batch | evaluate", choices=MODES)
    audio_path: Optional[str] = option(None, "the audio file (--mode single)")
    audio_dir: Optional[str] = option(None, "folder searched recursively for wav/flac/mp3/ogg files")
    output_file: Optional[str] = option(None, "write one 'path<TAB>text' line per file here (directory and batch "
                                              "modes: stdout when not given)")
    batch_size: int = option(16, "chunks decoded together (--mode single/batch/evaluate; directory decodes "
                                 "one file at a time)")
    reference_file: Optional[str] = option(None, "references for --mode evaluate: path<TAB>text, a Common "
                                                 "Voice TSV (path, sentence) or a manifest (path, text)")
    # every DecodingOptions / FallbackOptions field is a flag of its own (--beam_size, --temperature, ...)
    decoding: DecodingOptions = option(help="search settings", factory=lambda: DecodingOptions(best_of=5))
    fallback: FallbackOptions = option(help="temperature fallback", factory=FallbackOptions)
    vad: VadOptions = option(help="voice-activity chunks (--vad, --chunk_seconds, ...)", factory=VadOptions)
    word_timestamps: bool = option(False, "add word start/end times from the CTC head (json: segments[].words; "
                                          "needs a model trained with --ctc-weight > 0)")
    max_words_per_cue: Optional[int] = option(None, "srt/vtt: cut cues at word times, at most this many words "
                                                    "each (needs --word_timestamps)")
    highlight_words: bool = option(False, "srt/vtt: a cue per word, the word underlined (needs --word_timestamps)")
    condition_on_previous_text: bool = option(True, "with --vad false: prompt each 30 s window with the text so far")
    device: Optional[str] = option(None, "cpu, cuda, cuda:1, ... (default: cuda if available)")
    quantize: Optional[str] = quantize_option()
    dtype: Optional[str] = option(None, "float32 | float16 | bfloat16, or fp32 | fp16 | bf16 (default: float16 "
                                        "on cuda, else float32)", choices=tuple(DTYPE_ALIASES))
    output_format: Optional[str] = option(None, "also write per-file transcripts: txt|json|srt|vtt|tsv|all",
                                          choices=OUTPUT_FORMATS + ("all",))
    output_dir: str = option(".", "folder for --output_format files and the evaluate report")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self):
        require(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        require(Path(self.model_path).exists(), f"--model_path {self.model_path}: no such file or folder")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        if self.mode == "single":
            require(self.audio_path is not None, "--mode single needs --audio_path")
            require(Path(self.audio_path).is_file(), f"--audio_path {self.audio_path}: no such file")
        if self.mode in ("directory", "batch"):
            require(self.audio_dir is not None, f"--mode {self.mode} needs --audio_dir")
        if self.audio_dir is not None:
            require(Path(self.audio_dir).is_dir(), f"--audio_dir {self.audio_dir}: no such folder")
        if self.mode == "evaluate":
            require(self.reference_file is not None, "--mode evaluate needs --reference_file")
            require(Path(self.reference_file).is_file(), f"--reference_file {self.reference_file}: no such file")
        for name in ("max_words_per_cue", "highlight_words"):
            require(not getattr(self, name) or self.word_timestamps,
                    f"--{name} {getattr(self, name)} needs --word_timestamps (cues are cut at word times)")
        require(self.max_words_per_cue is None or self.max_words_per_cue >= 1,
                f"max_words_per_cue must be >= 1, got {self.max_words_per_cue}")
        object.__setattr__(self, "dtype", check_quantize(self.quantize, canonical_dtype(self.dtype)))


# -- files -------------------------------------------------------------------------------------

def list_audio(folder) -> list:
    """Every audio file under `folder`, recursively, sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())


class InputError(ValueError):
    """The inputs named on the command line cannot be used (no audio in --audio_dir, a reference
    file that cannot be read): one line, exit 2."""


def audio_files(folder) -> list:
    """list_audio, refusing a folder with nothing to transcribe (exiting 0 having done nothing
    would look like success)."""
    paths = list_audio(folder)
    if not paths:
        others = sum(1 for p in Path(folder).rglob("*") if p.is_file())
        raise InputError(f"--audio_dir {folder}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) in it or its "
                         f"subfolders ({others} other file(s))")
    return paths


def display_name(path: Path, roots: list) -> str:
    """The path relative to the first root that contains it (for output lines and file names):
    as the user sees it first (a symlink inside the root is named as the link), then with links
    resolved on both sides; else the path as given."""
    for root in roots:
        for p, r in ((Path(os.path.abspath(path)), Path(os.path.abspath(root))),
                     (Path(path).resolve(), Path(root).resolve())):
            try:
                return p.relative_to(r).as_posix()
            except ValueError:
                continue
    return str(path)


def output_stems(names: Sequence[str], reserved: Sequence[str] = ()) -> dict:
    """Each display name -> the stem its --output_format files take under --output_dir: the name
    without its extension, or with it where two inputs would share a stem (a.wav and a.mp3 ->
    a.wav.srt and a.mp3.srt) or the stem is one the run writes itself (the evaluate report). A
    name outside every root keeps only its file name: outputs stay under --output_dir."""
    bases = {n: Path(Path(n).name) if Path(n).is_absolute() else Path(n) for n in names}
    count = Counter(b.with_suffix("").as_posix().lower() for b in bases.values())  # a.WAV and A.flac clash on macOS
    stems, used = {}, set(r.lower() for r in reserved)
    for n, b in bases.items():
        key = b.with_suffix("").as_posix()
        stem = b if count[key.lower()] > 1 or key.lower() in used else b.with_suffix("")
        unique, k = stem, 2
        while unique.as_posix().lower() in used:  # the same file name from two folders outside the roots
            unique, k = stem.with_name(f"{stem.name}-{k}"), k + 1
        used.add(unique.as_posix().lower())
        stems[n] = unique
    return stems


def check_outputs(opts: TranscribeOptions) -> Optional[str]:
    """What is wrong with --output_file / --output_dir, found before any decoding (whose work
    would otherwise be lost when the first result or the report is written); None if nothing."""
    if opts.output_file:
        if not Path(opts.output_file).parent.is_dir():  # it is opened as the run starts: no folder is made for it
            return f"--output_file {opts.output_file}: no folder {Path(opts.output_file).parent}"
        problem = output_problem("--output_file", opts.output_file)
        if problem:
            return problem
    if opts.output_format or opts.mode == "evaluate":
        return output_problem("--output_dir", opts.output_dir, "folder")
    return None


class ResultWriter:
    """Writes each result as soon as it exists: a line in --output_file, --output_format files."""

    def __init__(self, opts: TranscribeOptions, roots: list, paths: Sequence = ()):
        self.opts, self.roots, self.failed = opts, roots, []
        reserved = ("evaluation",) if opts.mode == "evaluate" else ()
        self.stems = output_stems([display_name(Path(p), roots) for p in paths], reserved)
        self.file = open(opts.output_file, "w", encoding="utf-8") if opts.output_file else None
        # directory and batch modes with nowhere else to write: the lines go to stdout, not nowhere
        self.stdout = self.file is None and opts.mode in ("directory", "batch")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file:
            self.file.close()

    def write(self, path, result) -> None:
        name = display_name(Path(path), self.roots)
        if isinstance(result, Exception):  # reported, and the run goes on
            self.failed.append((name, str(result)))
            tqdm.write(f"failed: {result}" if isinstance(result, AudioError) else f"failed: {name}: {result}",
                       file=sys.stderr)
            return
        if self.file:
            self.file.write(f"{name}\t{result['text']}\n")
            self.file.flush()
        elif self.stdout:
            tqdm.write(f"{name}\t{result['text']}", file=sys.stdout)
        if self.opts.output_format:
            stem = self.stems.get(name) or output_stems([name])[name]
            write_result(result, Path(self.opts.output_dir) / stem, [self.opts.output_format],
                         self.opts.max_words_per_cue, self.opts.highlight_words)

    def status(self, n: int) -> int:
        if self.failed:
            print(f"{len(self.failed)} of {n} files failed: {', '.join(n for n, _ in self.failed)}", file=sys.stderr)
        return 1 if self.failed else 0


# -- modes -------------------------------------------------------------------------------------

def run_single(model, tokenizer, opts: TranscribeOptions) -> int:
    with ResultWriter(opts, [Path(opts.audio_path).parent], [opts.audio_path]) as out:
        try:
            result = transcribe(model, opts.audio_path, tokenizer, opts.decoding, opts.fallback,
                                opts.condition_on_previous_text, opts.word_timestamps, opts.vad, opts.batch_size)
        except (AudioError, ValueError) as e:
            out.write(opts.audio_path, e)
            return out.status(1)
        out.write(opts.audio_path, result)
    print(result["text"])
    return 0


def run_directory(model, tokenizer, opts: TranscribeOptions) -> int:
    paths = audio_files(opts.audio_dir)
    with ResultWriter(opts, [opts.audio_dir], paths) as out:
        for path in tqdm(paths, desc="transcribing", unit="file", disable=not opts.progress):
            try:
                result = transcribe(model, path, tokenizer, opts.decoding, opts.fallback,
                                    opts.condition_on_previous_text, opts.word_timestamps, opts.vad, opts.batch_size)
            except (AudioError, ValueError, RuntimeError) as e:
                result = e
            out.write(path, result)
        return out.status(len(paths))


def _progress(results, n: int, opts: TranscribeOptions):
    """(path, result) pairs passed through, with a progress bar."""
    bar = tqdm(total=n, desc="transcribing", unit="file", disable=not opts.progress)
    for path, result in results:
        bar.update(1)
        yield path, result
    bar.close()


def _batched(model, tokenizer, opts: TranscribeOptions, paths: list):
    return _progress(transcribe_files(model, paths, tokenizer, opts.decoding, opts.fallback, opts.batch_size,
                                      opts.condition_on_previous_text, opts.word_timestamps, opts.vad),
                     len(paths), opts)


def run_batch(model, tokenizer, opts: TranscribeOptions) -> int:
    paths = audio_files(opts.audio_dir)
    with ResultWriter(opts, [opts.audio_dir], paths) as out:
        for path, result in _batched(model, tokenizer, opts, paths):
            out.write(path, result)
        return out.status(len(paths))


def run_evaluate(model, tokenizer, opts: TranscribeOptions) -> int:
    try:
        refs, kind = resolve_references(opts.reference_file, opts.audio_dir)
    except (OSError, ValueError) as e:  # the messages name the file, the line and the problem
        raise InputError(f"--reference_file {e}" if isinstance(e, OSError) else str(e)) from None
    roots = [opts.audio_dir] if opts.audio_dir else []
    roots.append(Path(opts.reference_file).parent)
    on_disk = [str(p.resolve()) for p in list_audio(opts.audio_dir)] if opts.audio_dir else []
    missing_audio = [p for p in refs if not Path(p).is_file()]
    missing_ref = [p for p in on_disk if p not in refs]
    hyps = {}
    pairs = [(p, text) for p, text in refs.items() if Path(p).is_file()]
    with ResultWriter(opts, roots, [p for p, _ in pairs]) as out:
        for path, result in _progress(decode_references(model, tokenizer, pairs, opts.decoding, opts.fallback,
                                                        opts.batch_size, opts.condition_on_previous_text,
                                                        opts.word_timestamps, opts.vad),
                                      len(pairs), opts):
            out.write(path, result)
            if not isinstance(result, Exception):
                hyps[path] = result["text"]
    names = {p: display_name(Path(p), roots) for p in list(refs) + missing_ref}
    report = {"reference_file": opts.reference_file, "reference_format": kind, "model_path": opts.model_path,
              "options": asdict(replace(opts, decoding=replace(opts.decoding, lm=None))), "n_references": len(refs), "n_scored": len(hyps),
              "missing_audio": [names[p] for p in missing_audio], "missing_reference": [names[p] for p in missing_ref],
              "failed": [n for n, _ in out.failed]}
    if hyps:
        scored = [p for p in refs if p in hyps]
        ref_text, hyp_text = [refs[p] for p in scored], [hyps[p] for p in scored]
        report.update(error_rates(ref_text, hyp_text, normalize=tokenizer.normalize))
        rows = [{"path": names[p], **r} for p, r in zip(scored, utterance_errors(ref_text, hyp_text, tokenizer.normalize))]
        report["worst"] = worst(rows, 10)
        _write_evaluation(rows, report, Path(opts.output_dir))
    _print_evaluation(report)
    return 0 if hyps else 1


def _write_evaluation(rows: list, report: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cols = ("path", "wer", "errors", "substitutions", "insertions", "deletions", "n_ref_words", "reference", "hypothesis")
    with open(folder / "evaluation.tsv", "w", encoding="utf-8") as f:
        f.write("\t".join(cols) + "\n")
        for r in rows:
            f.write("\t".join(f"{r[c]:.4f}" if c == "wer" else str(r[c]) for c in cols) + "\n")
    (folder / "evaluation.json").write_text(json.dumps(_json_safe(report), ensure_ascii=False, indent=1) + "\n",
                                            encoding="utf-8")
    report["written"] = [str(folder / "evaluation.tsv"), str(folder / "evaluation.json")]


def _json_safe(obj):
    """inf (the WER of an empty reference with insertions) is not JSON: write null."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def _print_evaluation(report: dict) -> None:
    for key, what in (("missing_audio", "references without audio"), ("missing_reference", "audio without reference"),
                      ("failed", "files that failed to decode")):
        if report[key]:
            shown = ", ".join(report[key][:10]) + (" ..." if len(report[key]) > 10 else "")
            print(f"{len(report[key])} {what}: {shown}")
    if "wer" not in report:
        print("nothing was scored: no reference had a decodable audio file")
        return
    print(f"scored {report['n_scored']} of {report['n_references']} references ({report['reference_format']})")
    print(f"WER {100 * report['wer']:.2f} %  CER {100 * report['cer']:.2f} %  (S {report['substitutions']}, "
          f"I {report['insertions']}, D {report['deletions']}, {report['n_ref_words']} reference words)")
    if report["worst"]:
        print("worst utterances:")
        for r in report["worst"]:
            wer = "inf" if math.isinf(r["wer"]) else f"{100 * r['wer']:.0f} %"
            print(f"  {wer:>6}  {r['path']}\n          ref: {r['reference']}\n          hyp: {r['hypothesis']}")
    print("report: " + ", ".join(report["written"]))


RUNNERS = {"single": run_single, "directory": run_directory, "batch": run_batch, "evaluate": run_evaluate}


def check_model(opts: TranscribeOptions, model, tokenizer) -> Optional[str]:
    """Options that only the checkpoint can validate; the problem, or None."""
    if opts.decoding.ctc_weight > 0 and not model.dims.ctc:
        return f"--ctc_weight {opts.decoding.ctc_weight} needs a model with a CTC head; {opts.model_path} has none"
    if opts.word_timestamps and not model.dims.ctc:
        return f"--word_timestamps needs a model with a CTC head; {opts.model_path} has none"
    language = opts.decoding.language
    if language is not None and language not in tokenizer.languages:
        return f"--language {language!r} is not one of the model's languages {tokenizer.languages}"
    return None


def with_language_model(opts: TranscribeOptions, model, tokenizer) -> tuple:
    """(opts with --lm_path loaded, None), or (opts, the problem) for an unusable LM file."""
    try:
        return replace(opts, decoding=D.with_language_model(opts.decoding, tokenizer, model.dims.n_vocab)), None
    except (OSError, ValueError) as e:
        return opts, f"--lm_path: {e}"


def with_chunk_seconds(opts: TranscribeOptions, ckpt: dict) -> TranscribeOptions:
    """The chunk lengths the checkpoint records, where the flags leave them unset
    (vad.with_checkpoint_chunks); a note when neither says how long a chunk may be."""
    vad = with_checkpoint_chunks(opts.vad, ckpt)
    if vad.vad and vad.chunk_seconds is None:
        print(f"note: {opts.model_path} does not record its longest training clip; voice-activity chunks "
              "go up to one window (set --chunk_seconds to what it was trained on)", file=sys.stderr)
    return replace(opts, vad=vad)


def main(argv=None) -> int:
    opts = parse_options(TranscribeOptions, argv)
    one_line_audio_warnings("transcribe.py")
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    problem = check_outputs(opts)
    if problem is None:
        try:
            check_device(device)
        except ValueError as e:
            problem = str(e)
    if problem:  # before the model is read and any file decoded
        print(f"transcribe.py: error: {problem}", file=sys.stderr)
        return 2
    try:
        model, tokenizer, ckpt = load_model(opts.model_path, device)
    except (CheckpointError, FileNotFoundError) as e:  # one line: what the file is and what to do
        print(f"transcribe.py: error: --model_path {e}", file=sys.stderr)
        return 2
    try:
        model = quantize(model, opts.quantize, device)
    except ValueError as e:
        print(f"transcribe.py: error: {e}", file=sys.stderr)
        return 2
    opts = with_chunk_seconds(opts, ckpt)
    problem = check_model(opts, model, tokenizer)
    if problem is None:
        opts, problem = with_language_model(opts, model, tokenizer)
    if problem:  # fail before the first file rather than once per file
        print(f"transcribe.py: error: {problem}", file=sys.stderr)
        return 2
    with precision(opts.dtype, device):
        try:
            return RUNNERS[opts.mode](model, tokenizer, opts)
        except InputError as e:
            print(f"transcribe.py: error: {e}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
