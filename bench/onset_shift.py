"""Does a model hear a word that starts later than the first frame? FSDD's digits are cut tight to
their speech (most start within 30 ms), so a model trained on them may tie a digit to where it sits
in the window. The test clips are decoded three ways with one model and one search:

  - as recorded;
  - shifted: every clip that starts within --tight_ms gets --lead_seconds of its own noise floor
    before it (Gaussian noise at the RMS of its quietest 10 ms frame): the same speech, later;
  - trimmed: every clip whose speech starts later than --tight_ms is cut to start 20 ms before it.

and the WER of each is printed, with the clips each version got wrong.

    python bench/onset_shift.py --model_path exp/fsdd_off/official/last.pt
        [--reference_file exp/fsdd_off/official/test.tsv] [--audio_dir ../shared/data/fsdd]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from whisper_scratch.checkpoint import load_model  # noqa: E402
from whisper_scratch.decoding import DecodingOptions  # noqa: E402
from whisper_scratch.evaluation import decode_references, resolve_references, score  # noqa: E402

FRAME_S = 0.01


def frame_rms(audio: np.ndarray, sr: int) -> np.ndarray:
    n = int(FRAME_S * sr)
    frames = audio[: len(audio) // n * n].reshape(-1, n)
    return np.sqrt((frames ** 2).mean(1) + 1e-12)


def onset_seconds(rms: np.ndarray, below_peak_db: float = 20.0) -> float:
    """Where the speech starts: the first 10 ms frame (rms: frame_rms) within below_peak_db of the loudest."""
    return float(np.argmax(20 * np.log10(rms / rms.max()) > -below_peak_db)) * FRAME_S


def variants(pairs: list, lead: float, tight: float, out: Path, seed: int = 0) -> dict:
    """{"shifted": [(original, copy, text)], "trimmed": [...]}: the changed copies written under out."""
    rng = np.random.default_rng(seed)
    made = {"shifted": [], "trimmed": []}
    for path, text in pairs:
        audio, sr = sf.read(path, dtype="float32")
        rms = frame_rms(audio, sr)
        start = onset_seconds(rms)
        if start <= tight:
            floor = rms.min()
            new, kind = np.concatenate([rng.normal(0, floor, int(lead * sr)).astype(np.float32), audio]), "shifted"
        else:
            new, kind = audio[int(max(0.0, start - 0.02) * sr):], "trimmed"
        target = out / kind / Path(path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        sf.write(target, new, sr)
        made[kind].append((path, str(target), text))
    return made


def decode(model, tokenizer, pairs: list, options: DecodingOptions) -> dict:
    hyps = {}
    for path, result in decode_references(model, tokenizer, pairs, options, batch_size=64):
        if isinstance(result, Exception):
            raise SystemExit(f"{path}: {result}")
        hyps[path] = result["text"]
    return hyps


def report(name: str, pairs: list, hyps: dict, tokenizer) -> None:
    s = score(pairs, hyps, tokenizer)
    wrong = [f"{Path(p).name} {ref} -> {hyps[p]}" for p, ref in pairs
             if tokenizer.normalize(hyps[p]) != tokenizer.normalize(ref)]
    print(f"{name:>9}: {len(pairs)} clips, WER {100 * s['wer']:.1f} % ({len(wrong)} wrong)")
    for w in wrong[:12]:
        print(f"           {w}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", required=True)
    ap.add_argument("--reference_file", default=None, help="default: test.tsv beside the checkpoint")
    ap.add_argument("--audio_dir", default=str(REPO.parent / "shared" / "data" / "fsdd"))
    ap.add_argument("--lead_seconds", type=float, default=0.25)
    ap.add_argument("--tight_ms", type=float, default=60.0)
    ap.add_argument("--beam_size", type=int, default=4)
    ap.add_argument("--ctc_weight", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reference = args.reference_file or str(Path(args.model_path).parent / "test.tsv")
    try:
        model, tokenizer, _ = load_model(args.model_path)
        refs, _ = resolve_references(reference, args.audio_dir)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    pairs = sorted(refs.items())
    options = DecodingOptions(beam_size=args.beam_size, ctc_weight=args.ctc_weight, language="en")
    as_is = decode(model, tokenizer, pairs, options)
    with tempfile.TemporaryDirectory() as tmp:
        made = variants(pairs, args.lead_seconds, args.tight_ms / 1000, Path(tmp))
        report("all as is", pairs, as_is, tokenizer)
        for kind, changed in made.items():
            copies = [(new, text) for _, new, text in changed]
            report(f"{kind}", copies, decode(model, tokenizer, copies, options), tokenizer)
            report("as is", [(old, text) for old, _, text in changed], as_is, tokenizer)


if __name__ == "__main__":
    main()
