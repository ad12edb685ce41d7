"""Accuracy of a trained checkpoint when deployed with faster-whisper, against our own decoding.

The checkpoint is exported with `whisper_scratch.export --to ct2` (faster-whisper's layout, fp32
and int8) and the first --clips clips of a split are transcribed by:

- ours: `decoding.decode`, greedy, each clip at its own length (how we train and evaluate);
- ours, 30 s: greedy on the features faster-whisper computes, zero-padded to 30 s as it does;
- faster-whisper fp32 and int8: `WhisperModel.transcribe(language=..., without_timestamps=True,
  beam_size=1, temperature=0)`; our models are trained without timestamp tokens.

Prints corpus WER/CER (jiwer, our normaliser) for each, and how many transcripts equal "ours, 30 s"
(the function faster-whisper computes). The gap between the first two rows is the cost of 30 s
padding for a model trained on unpadded clips; the others should equal the second row.

    python bench/fw_accuracy.py --checkpoint exp/demo_mn/best_model.pt --data data/synth_mn --split test
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from whisper_scratch.audio import load_audio, log_mel_spectrogram  # noqa: E402
from whisper_scratch.checkpoint import load_model  # noqa: E402
from whisper_scratch.data import load_split  # noqa: E402
from whisper_scratch.decoding import DecodingOptions, decode  # noqa: E402
from whisper_scratch.export.ct2 import export_ct2  # noqa: E402
from whisper_scratch.metrics import error_rates  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True, help="Common Voice folder or manifest")
    ap.add_argument("--split", default="test")
    ap.add_argument("--language", default="mn")
    ap.add_argument("--clips", type=int, default=100)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from faster_whisper import WhisperModel
    from faster_whisper.audio import pad_or_trim as fw_pad

    model, tok, _ = load_model(args.checkpoint)
    model.eval()
    utts = load_split(args.data, args.split, args.language)[: args.clips]
    refs = [u.text for u in utts]
    audios = [load_audio(u.audio) for u in utts]
    hyps, fw_models = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for q in ("float32", "int8"):
            export_ct2(model, tok, Path(tmp) / q, q)
            fw_models[q] = WhisperModel(str(Path(tmp) / q), device="cpu", compute_type=q, cpu_threads=args.threads)
        opts = DecodingOptions(language=args.language)
        ours, padded = [], []
        for i in range(0, len(audios), 16):  # batches of 16, as transcribe.py --mode batch
            mels = [log_mel_spectrogram(a, model.dims.n_mels) for a in audios[i:i + 16]]
            lens = torch.tensor([m.shape[-1] for m in mels])
            var = torch.stack([F.pad(m, (0, int(lens.max()) - m.shape[-1])) for m in mels])
            ours += [r.text for r in decode(model, var, lens, tok, opts)]
            fw_feats = [fw_models["float32"].feature_extractor(a)[..., :-1] for a in audios[i:i + 16]]
            full = torch.stack([torch.from_numpy(fw_pad(f)).float() for f in fw_feats])
            padded += [r.text for r in decode(model, full, None, tok, opts)]
            print(f"ours: {len(ours)}/{len(audios)} clips", file=sys.stderr, flush=True)
        hyps["ours (own length)"], hyps["ours, 30 s"] = ours, padded
        for q, fw in fw_models.items():
            out = []
            for audio in audios:
                segments, _ = fw.transcribe(audio, language=args.language, without_timestamps=True, beam_size=1,
                                            temperature=0.0, condition_on_previous_text=False)
                out.append(" ".join(s.text.strip() for s in segments))
            hyps[f"faster-whisper {q}"] = out
    print(f"{args.checkpoint}: {len(utts)} clips of {args.data} {args.split}, greedy")
    print(f"{'decoder':<22} {'WER %':>7} {'CER %':>7} {'same as ours, 30 s':>19}")
    for name, h in hyps.items():
        r = error_rates(refs, h, tok.normalize)
        same = sum(a == b for a, b in zip(h, hyps["ours, 30 s"]))
        print(f"{name:<22} {100 * r['wer']:>7.2f} {100 * r['cer']:>7.2f} {f'{same}/{len(h)}':>19}")


if __name__ == "__main__":
    main()
