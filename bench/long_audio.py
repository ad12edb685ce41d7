"""Long recordings: accuracy and speed of voice-activity chunks vs fixed 30 s windows, and how
silero-vad cuts real speech.

1. Recordings of about 30, 60 and 150 s are built by joining the demo corpus's test clips (in a
   seeded random order) with --pause seconds of silence (written to --work_dir, with their
   references). Each is transcribed three ways with the same model, search and threads:
   - clips: the same clips decoded one by one (the CER a long recording should match);
   - vad: the default of transcribe.py: speech chunks of at most the longest training clip, cut
     at pauses where longer than the median clip, decoded together in batches;
   - windows: `--vad false`, consecutive 30 s windows prompted with the text so far.
   Prints CER/WER of each, the CER ratio vad / clips (target ≤ 1.1) and the speed of vad vs
   windows on the longest recording in audio seconds per second (target ≥ 3×).
2. Real speech: for each Common Voice language in shared/data/cv_sample, --cv_clips clips joined
   with 0.5 s of silence (60+ s): the share of each clip's speech (silero on the clip alone) that
   the chunks keep, and chunk edges that fall inside a clip's speech (target: none).

    python bench/long_audio.py [--model_path exp/demo_mn/best_model.pt] [--lm_path exp/demo_mn/lm.json.gz] [--threads 2]
"""
from __future__ import annotations

import argparse
import csv
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from whisper_scratch.audio import SAMPLE_RATE, load_audio  # noqa: E402
from whisper_scratch.checkpoint import load_model  # noqa: E402
from whisper_scratch.data import read_references  # noqa: E402
from whisper_scratch.decoding import NO_FALLBACK, DecodingOptions, FallbackOptions, with_language_model  # noqa: E402
from whisper_scratch.longform import transcribe, transcribe_files  # noqa: E402
from whisper_scratch.metrics import error_rates  # noqa: E402
from whisper_scratch.vad import VadOptions, check_against_clips, speech_chunks, with_checkpoint_chunks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WHISPER_SCRATCH_SHARED", REPO.parent / "shared"))


def build_recordings(clips_dir: Path, refs: list, lengths: list, pause: float, seed: int, out: Path) -> list:
    """[(wav path, [(clip path, reference)], seconds)]: disjoint runs of clips, each joined to at
    least its target length, pause seconds of silence after every clip."""
    order = list(refs)
    random.Random(seed).shuffle(order)
    out.mkdir(parents=True, exist_ok=True)
    gap = np.zeros(int(pause * SAMPLE_RATE), np.float32)
    recordings, i = [], 0
    for target in lengths:
        parts, used = [], []
        while sum(map(len, parts)) < target * SAMPLE_RATE:
            if i == len(order):
                raise SystemExit(f"not enough test clips for recordings of {lengths} s")
            path, text = order[i]
            i += 1
            parts += [load_audio(clips_dir / path), gap]
            used.append((str(clips_dir / path), text))
        audio = np.concatenate(parts)
        wav = out / f"long_{target}s.wav"
        sf.write(wav, audio, SAMPLE_RATE)
        recordings.append((wav, used, len(audio) / SAMPLE_RATE))
    return recordings


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def accuracy_and_speed(args, model, tokenizer, ckpt: dict) -> None:
    lang_dir = Path(args.corpus)
    refs, _ = read_references(lang_dir / "test.tsv")
    recordings = build_recordings(lang_dir / "clips", refs, args.lengths, args.pause, args.seed, Path(args.work_dir))
    options = DecodingOptions(beam_size=args.beam_size, ctc_weight=args.ctc_weight, best_of=5,
                              lm_path=args.lm_path, lm_weight=args.lm_weight if args.lm_path else 0.0)
    options = with_language_model(options, tokenizer, model.dims.n_vocab)
    fallback = FallbackOptions() if args.fallback else NO_FALLBACK
    vad = with_checkpoint_chunks(VadOptions(chunk_seconds=args.chunk_seconds, target_seconds=args.target_seconds),
                                 ckpt)
    print(f"model {args.model_path}; chunks ≤ {vad.chunk_seconds} s, cut at pauses above {vad.target_seconds} s; beam {args.beam_size}, CTC {args.ctc_weight}; "
          f"LM {args.lm_path or 'none'} (weight {options.lm_weight}); "
          f"temperature fallback {'on' if args.fallback else 'off'}; {torch.get_num_threads()} threads; pause {args.pause} s\n")
    print("| recording | clips | CER clips one by one | CER vad | ratio | CER 30 s windows | WER clips / vad / windows |")
    print("|---|---|---|---|---|---|---|")
    speeds, pooled = {}, ([], [], [], [])
    for wav, used, seconds in recordings:
        ref = " ".join(t for _, t in used)
        per_clip = dict(transcribe_files(model, [p for p, _ in used], tokenizer, options, fallback, args.batch_size))
        clips_hyp = " ".join(per_clip[p]["text"] for p, _ in used)
        vad_result, vad_s = timed(lambda: transcribe(model, wav, tokenizer, options, fallback, vad=vad,
                                                     batch_size=args.batch_size))
        win_result, win_s = timed(lambda: transcribe(model, wav, tokenizer, options, fallback))
        scores = [error_rates([ref], [h], tokenizer.normalize) for h in (clips_hyp, vad_result["text"],
                                                                         win_result["text"])]
        c, v, w = (100 * s["cer"] for s in scores)
        print(f"| {wav.name} ({seconds:.0f} s) | {len(used)} | {c:.1f} % | {v:.1f} % | **{v / c:.2f}×** | {w:.1f} % | "
              + " / ".join(f"{100 * s['wer']:.0f} %" for s in scores) + " |")
        speeds[wav.name] = (seconds, vad_s, win_s)
        for texts, text in zip(pooled, (ref, clips_hyp, vad_result["text"], win_result["text"])):
            texts.append(text)
    c, v, w = (100 * error_rates(pooled[0], h, tokenizer.normalize)["cer"] for h in pooled[1:])
    print(f"| all {len(recordings)} (errors pooled) | {sum(len(u) for _, u, _ in recordings)} | {c:.1f} % | {v:.1f} % | "
          f"**{v / c:.2f}×** | {w:.1f} % | |")
    name = max(speeds, key=lambda k: speeds[k][0])
    seconds, vad_s, win_s = speeds[name]
    print(f"\nspeed on {name}: vad {seconds / vad_s:.1f} audio s/s ({vad_s:.1f} s), windows "
          f"{seconds / win_s:.1f} audio s/s ({win_s:.1f} s): **{win_s / vad_s:.2f}×**")


def real_speech(args) -> None:
    print(f"\nreal speech (shared/data/cv_sample, {args.cv_clips} clips per language, 0.5 s apart, chunks ≤ 10 s)\n")
    print("| language | audio | chunks | least speech kept in a clip | edges inside speech |")
    print("|---|---|---|---|---|")
    for folder in sorted(p for p in (SHARED / "data" / "cv_sample").iterdir() if p.is_dir()):
        with open(folder / "validated.tsv", encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))[:args.cv_clips]
        clips = [load_audio(folder / "clips" / r["path"]) for r in rows]
        gap = np.zeros(SAMPLE_RATE // 2, np.float32)
        offsets = np.cumsum([0] + [len(c) + len(gap) for c in clips[:-1]])
        audio = np.concatenate([x for c in clips for x in (c, gap)])
        chunks = speech_chunks(audio, 10.0)
        report = check_against_clips(chunks, offsets, clips)
        kept, inside = min(k for k, _ in report), sum(len(e) for _, e in report)
        print(f"| {folder.name} | {len(audio) / SAMPLE_RATE:.0f} s | {len(chunks)} | {100 * kept:.0f} % | {inside} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model_path", default=str(REPO / "exp/demo_mn/best_model.pt"))
    ap.add_argument("--corpus", default=str(REPO / "data/synth_mn/mn"), help="folder with test.tsv and clips/")
    ap.add_argument("--work_dir", default=str(REPO / "exp/long_audio"))
    ap.add_argument("--lengths", type=float, nargs="+", default=[30, 60, 150])
    ap.add_argument("--pause", type=float, default=0.6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--beam_size", type=int, default=4)
    ap.add_argument("--ctc_weight", type=float, default=0.3)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--chunk_seconds", type=float, default=None, help="default: the checkpoint's longest clip")
    ap.add_argument("--target_seconds", type=float, default=None, help="default: the checkpoint's median clip")
    ap.add_argument("--lm_path", default=None, help="a language model fused into beam search (./run.sh writes OUT/lm.json.gz)")
    ap.add_argument("--lm_weight", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fallback", action="store_true", help="temperature fallback as transcribe.py (best_of 5)")
    ap.add_argument("--cv_clips", type=int, default=15)
    ap.add_argument("--skip_model", action="store_true", help="only the real-speech segmentation check")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_model:
        if not Path(args.model_path).is_file():
            raise SystemExit(f"{args.model_path}: no such checkpoint (train one with ./run.sh, or --skip_model)")
        if not (Path(args.corpus) / "test.tsv").is_file():
            raise SystemExit(f"{args.corpus}/test.tsv not found (./run.sh builds the demo corpus)")
        model, tokenizer, ckpt = load_model(args.model_path)
        accuracy_and_speed(args, model, tokenizer, ckpt)
    if args.cv_clips > 0:  # --cv_clips 0: the model part only
        real_speech(args)


if __name__ == "__main__":
    main()
