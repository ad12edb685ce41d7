"""Accuracy of one checkpoint in the tools users deploy with, each run by its own code, against ours.

The checkpoint is exported (`whisper_scratch.export`) to openai-whisper (.pt), Hugging Face
(folder), CTranslate2 / faster-whisper (fp32, int8) and whisper.cpp (GGML, via pywhispercpp), and
the first --clips clips of a split are transcribed, greedy and with beam search (--beam), by:

- ours: `decoding.decode` on each clip at its own length (how we train and evaluate), and the
  same on the 30 s inputs the tools build (the function they compute);
- openai-whisper: `whisper.transcribe` (temperature 0, no fallback) and `whisper.decode`;
- HF: `pipeline("automatic-speech-recognition")` and `model.generate`;
- faster-whisper: `WhisperModel(...).transcribe`, float32 and int8;
- whisper.cpp: `pywhispercpp.model.Model(...).transcribe` (30 s window, its default).

Every tool pads to 30 s without a mask. Prints corpus WER/CER (jiwer, our normaliser), the ratio to
our own-length CER with the same search, and how many transcripts equal ours on the same 30 s
input (zero features for faster-whisper and openai's transcribe, which pad the log-mel; the
silence floor for openai's decode, HF and whisper.cpp, which pad the audio).
Nothing is timed.

    python bench/deploy_accuracy.py --checkpoint exp/demo_mn/best_model.pt --data data/synth_mn --split test
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from whisper_scratch.audio import N_FRAMES, load_audio, log_mel_spectrogram  # noqa: E402
from whisper_scratch.checkpoint import load_model  # noqa: E402
from whisper_scratch.data import load_split  # noqa: E402
from whisper_scratch.decoding import DecodingOptions, decode  # noqa: E402
from whisper_scratch.export.openai import require_plain_log_mels  # noqa: E402
from whisper_scratch.metrics import error_rates  # noqa: E402

BATCH = 16


def ours(model, tok, audios, beam, language, pad=None):
    """Our decoding; pad None: each clip at its own length; "floor" / "zero": padded to 30 s as
    openai, HF and whisper.cpp (audio zeros -> the log-mel floor) or faster-whisper (zero features) do."""
    opts = DecodingOptions(language=language, beam_size=beam)
    out = []
    for i in range(0, len(audios), BATCH):
        mels = [log_mel_spectrogram(a, model.dims.n_mels) for a in audios[i:i + BATCH]]
        if pad is None:
            lens = torch.tensor([m.shape[-1] for m in mels])
            x = torch.stack([F.pad(m, (0, int(lens.max()) - m.shape[-1])) for m in mels])
        else:
            lens = None
            x = torch.stack([F.pad(m, (0, N_FRAMES - m.shape[-1]), value=float(m.max()) - 2 if pad == "floor" else 0.0)
                             for m in mels])
        out += [r.text for r in decode(model, x, lens, tok, opts)]
    return out


def openai_rows(path, tok, audios, beam, language):
    import whisper

    from whisper_scratch.export.openai import openai_tokenizer

    model = whisper.load_model(str(path), device="cpu").eval()
    search = {"beam_size": beam} if beam > 1 else {}
    rows = {}
    with openai_tokenizer(tok):
        rows["openai-whisper transcribe"] = [
            whisper.transcribe(model, a, language=language, without_timestamps=True, temperature=0.0, fp16=False,
                               condition_on_previous_text=False, **search)["text"] for a in audios]
        opts = whisper.DecodingOptions(language=language, without_timestamps=True, fp16=False, **search)
        rows["openai-whisper decode"] = [
            whisper.decode(model, whisper.log_mel_spectrogram(whisper.pad_or_trim(a), model.dims.n_mels), opts).text
            for a in audios]
    return rows


def hf_rows(folder, audios, beam, language):
    from transformers import AutoProcessor, WhisperForConditionalGeneration

    from whisper_scratch.export.hf import hf_pipeline

    pipe = hf_pipeline(folder, device="cpu")
    kw = {"language": language, "num_beams": beam, "do_sample": False}
    rows = {"HF pipeline": [pipe(a.copy(), generate_kwargs=kw)["text"] for a in audios]}
    processor = AutoProcessor.from_pretrained(folder)
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    out = []
    for i in range(0, len(audios), BATCH):
        feats = processor(list(audios[i:i + BATCH]), sampling_rate=16000, return_tensors="pt").input_features
        with torch.no_grad():
            ids = model.generate(input_features=feats, **kw)
        out += processor.batch_decode(ids, skip_special_tokens=True)
    rows["HF generate"] = out
    return rows


def fw_rows(folders, audios, beam, language, threads):
    from faster_whisper import WhisperModel

    rows = {}
    for q, folder in folders.items():
        fw = WhisperModel(str(folder), device="cpu", compute_type=q, cpu_threads=threads)
        rows[f"faster-whisper {q}"] = [
            " ".join(s.text.strip() for s in fw.transcribe(a, language=language, beam_size=beam, temperature=0.0,
                                                           without_timestamps=True,
                                                           condition_on_previous_text=False)[0])
            for a in audios]
    return rows


def whispercpp_rows(files, audios, beam, language, threads):
    """whisper.cpp through pywhispercpp: our settings (no timestamps, flash attention off,
    export.ggml's helpers) on its own 30 s mel, and pywhispercpp's `Model` with its defaults
    (greedy, f16 only: timestamps on, flash attention on, temperature fallback) as a user would
    first try it."""
    from pywhispercpp.model import Model

    from whisper_scratch.export.ggml import whisper_cpp_context, whisper_cpp_params, whisper_cpp_text, whisper_cpp_tokens

    rows = {}
    for kind, path in files.items():
        ctx = whisper_cpp_context(path)
        params = whisper_cpp_params(language, n_threads=threads, beam_size=beam)
        out = []
        for a in audios:
            whisper_cpp_tokens(ctx, params, audio=a)
            out.append(whisper_cpp_text(ctx))
        rows[f"whisper.cpp {kind}"] = out
        if beam == 1 and kind == "f16":  # slow: its defaults include temperature fallback
            model = Model(str(path), redirect_whispercpp_logs_to=None, language=language, n_threads=threads,
                          print_progress=False, print_realtime=False)
            rows[f"whisper.cpp {kind}, pywhispercpp Model defaults"] = [
                " ".join(s.text.strip() for s in model.transcribe(a.astype(np.float32))) for a in audios]
    return rows


def export_all(ckpt, model, tok, tmp: Path, tools: set) -> dict:
    from whisper_scratch.export import export_ct2, export_hf, export_openai

    paths = {}
    if "openai" in tools:
        paths["openai"] = export_openai(model, tmp / "model.pt")
    if "hf" in tools:
        paths["hf"] = export_hf(model, tok, tmp / "hf")
    if "fw" in tools:
        paths["fw"] = {q: export_ct2(model, tok, tmp / f"ct2_{q}", q) for q in ("float32", "int8")}
    if "whispercpp" in tools:
        from whisper_scratch.export.ggml import export_ggml

        # f16: the convolution of whisper.cpp 1.8.2 (pywhispercpp 1.4.1) aborts on an f32 file
        paths["whispercpp"] = {t: export_ggml(model, tok, tmp / f"ggml-{t}.bin", t) for t in ("f16", "q8_0")}
    return paths


class Table:
    """Prints each tool's rows as soon as they are decoded (a full run takes a while)."""

    OURS = ("ours (own length)", "ours, 30 s silence padding", "ours, 30 s zero-feature padding")

    def __init__(self, refs, tok, ours: dict, title: str):
        self.refs, self.tok, self.ours = refs, tok, ours
        self.base = error_rates(refs, ours[self.OURS[0]], tok.normalize)["cer"]
        print(title)
        print(f"{'decoder':<44} {'WER %':>7} {'CER %':>7} {'CER / ours':>10} {'same as ours, 30 s':>19}")
        self.add(ours)

    def add(self, rows: dict) -> None:
        for name, h in rows.items():
            r = error_rates(self.refs, h, self.tok.normalize)
            same = ""
            if name not in self.OURS:
                # faster-whisper and openai's transcribe pad the log-mel with zeros; openai's decode
                # (on pad_or_trim(audio)), HF and whisper.cpp pad the audio, which the log-mel floors
                zero = name.startswith(("faster-whisper", "openai-whisper transcribe"))
                ref = self.ours[self.OURS[2] if zero else self.OURS[1]]
                same = f"{sum(a.strip() == b.strip() for a, b in zip(h, ref))}/{len(h)}"
            print(f"{name:<44} {100 * r['wer']:>7.2f} {100 * r['cer']:>7.2f} {r['cer'] / max(self.base, 1e-9):>9.2f}× "
                  f"{same:>19}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True, help="Common Voice folder or manifest")
    ap.add_argument("--split", default="test")
    ap.add_argument("--language", default="mn")
    ap.add_argument("--clips", type=int, default=100)
    ap.add_argument("--beam", type=int, default=5, help="beam size of the beam-search rows")
    ap.add_argument("--tools", default="openai,hf,fw,whispercpp")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tools = set(args.tools.split(","))
    try:
        model, tok, _ = load_model(args.checkpoint)
        require_plain_log_mels(model.dims)  # every tool here feeds plain log-mels
        utts = load_split(args.data, args.split, args.language)[: args.clips]
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    model.eval()
    refs, audios = [u.text for u in utts], [load_audio(u.audio) for u in utts]
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_all(args.checkpoint, model, tok, Path(tmp), tools)
        for beam in sorted({1, args.beam}):  # --beam 1: greedy only
            ours_rows = {"ours (own length)": ours(model, tok, audios, beam, args.language),
                         "ours, 30 s silence padding": ours(model, tok, audios, beam, args.language, "floor"),
                         "ours, 30 s zero-feature padding": ours(model, tok, audios, beam, args.language, "zero")}
            t = Table(refs, tok, ours_rows, f"{args.checkpoint}: {len(utts)} clips of {args.data} {args.split}, "
                      + ("greedy" if beam == 1 else f"beam {beam}"))
            if "openai" in tools:
                t.add(openai_rows(paths["openai"], tok, audios, beam, args.language))
            if "hf" in tools:
                t.add(hf_rows(paths["hf"], audios, beam, args.language))
            if "fw" in tools:
                t.add(fw_rows(paths["fw"], audios, beam, args.language, args.threads))
            if "whispercpp" in tools:
                t.add(whispercpp_rows(paths["whispercpp"], audios, beam, args.language, args.threads))
            print(flush=True)

if __name__ == "__main__":
    main()
