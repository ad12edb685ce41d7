"""Decoding speed against other Whisper implementations on this CPU: same weights, same clips,
same number of generated tokens, same threads.

A randomly initialised model (default the `tiny` preset: d 384, 4+4 layers, Mongolian character
vocabulary) is exported with whisper_scratch.export to openai-whisper, Hugging Face transformers
and CTranslate2 (fp32 and int8). 16 clips of 4.5-5.5 s (cut from shared/data/samples, as
bench/decode.py) are decoded in one batch, greedy and beam 5, by:

- ours: `decoding.decode`, batched, each clip at its own length (mel_lens), no 30 s padding;
- ours, 30 s: the same code on mels padded to 30 s (what the others must do), to separate the
  variable-length gain from the implementation's own speed;
- HF: `WhisperForConditionalGeneration.generate` on 30 s mels;
- ours, int8: the same with `--quantize int8` (every nn.Linear dynamically quantised);
- ours, bf16: the same with `--quantize bf16` (weights and activations in bfloat16, LayerNorms fp32;
  CTranslate2 has no bf16 on the CPU, so it is compared with CTranslate2's fastest, int8);
- CTranslate2 fp32 and int8, unpadded: `ctranslate2.models.Whisper.generate` on the same batch
  padded only to its longest clip (it accepts fewer than 3000 frames), exported with our
  vocabulary size (`--compact`): the fastest way a user can run it, and the fair comparison;
- CTranslate2 fp32 and int8 on 30 s mels (what faster-whisper does by default), and fp32 in
  faster-whisper's padded 51,865-token layout (the default export), whose output layer is that much
  wider;
- openai-whisper: `whisper.decode` on 30 s mels (beam search one clip at a time: its batched beam
  search fails in 20250625, openai/whisper#2197).

The log-mels are computed once, outside the timings. A random model has no reason to stop, and
the implementations would stop at different places, so <|endoftext|> is made unreachable (its
embedding points against the final LayerNorm's bias: logit ≈ -30 while others are within ±1) and
every clip decodes exactly --max_new_tokens tokens; the script prints the counts and how many
transcripts equal ours (the 30 s implementations: equal to "ours, padded to 30 s", which
computes their function; beam searches differ in details, so only greedy must match). Prints seconds (best of --repeats) and our
speed ratio (their time / ours; > 1: we are faster).

A last table decodes the clips one at a time (greedy, each at its own length; what --mode
directory and a lightly loaded server do): ours fp32 and int8 against CTranslate2 fp32 and int8.

CTranslate2 is timed in a child process of its own (this script with --ct2_child), one after the
other with ours, never beside it: once CTranslate2 has run in a process, its OpenMP threads make
every later torch decode in that process 1.6-2x slower (measured: ours greedy 0.71 s before, 1.12 s
after), while CTranslate2 alone in a process is as fast as beside torch. The same clips, exports and
tokens are used; the child writes its times and outputs to a JSON file.

    python bench/vs_decode.py [--threads 2] [--size tiny] [--max_new_tokens 64] [--beam_size 5]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from decode import make_clips, random_model  # noqa: E402  (bench/decode.py: same clips)
from openai_shim import openai_decode  # noqa: E402  (tests/openai_shim.py)
from whisper_scratch.audio import load_audio, log_mel_spectrogram  # noqa: E402
from whisper_scratch.checkpoint import quantize  # noqa: E402
from whisper_scratch.decoding import DecodingOptions, decode  # noqa: E402
from whisper_scratch.export.ct2 import export_ct2  # noqa: E402
from whisper_scratch.export.hf import export_hf  # noqa: E402
from whisper_scratch.export.openai import export_openai, load_openai_model  # noqa: E402


def load_mels(paths: list, n_mels: int) -> list:
    return [log_mel_spectrogram(load_audio(p), n_mels) for p in paths]


def batch_padded(mels: list, frames=None):
    """(B, n_mels, frames or the longest) zero-padded, and the real lengths."""
    lens = torch.tensor([m.shape[-1] for m in mels])
    T = frames or int(lens.max())
    return torch.stack([F.pad(m, (0, T - m.shape[-1])) for m in mels]).contiguous(), lens


class Runner:
    """One implementation: run(beam) -> token lists (text tokens only, prompt and eot removed).
    same_as: the runner whose function it computes (its "same text" column counts equal outputs).
    measured: {table name: (seconds, token lists)} already timed elsewhere (CTranslate2's child)."""

    def __init__(self, name: str, run, same_as: str = "ours (variable length)", measured: Optional[dict] = None):
        self.name, self.run, self.same_as, self.measured = name, run, same_as, measured


CT2_ROWS = {"CT2 fp32, unpadded": ("float32", "var"), "CT2 int8, unpadded": ("int8", "var"),
            "CT2 fp32, 30 s": ("float32", "full"), "CT2 int8, 30 s": ("int8", "full"),
            "CT2 fp32, 30 s, fw vocab": ("fw", "full")}
ONE_BY_ONE = "one by one, greedy"


def ct2_child(folder: Path) -> None:
    """--ct2_child: time every CTranslate2 row on the inputs `folder/inputs.npz` and the exports
    beside it (no torch compute in this process), writing `folder/ct2.json`."""
    import json
    spec = json.loads((folder / "spec.json").read_text())
    data = np.load(folder / "inputs.npz")
    mels = [data[f"mel{i}"] for i in range(spec["clips"])]
    inputs = {"var": data["var"], "full": data["full"]}
    cts = ct2_load(folder, spec["threads"])
    n_new, prompt, out = spec["max_new_tokens"], spec["prompt"], {}

    def best(fn):
        fn()  # warm-up
        return min((timed(fn, 1) for _ in range(spec["repeats"])), key=lambda r: r[0])
    for name, (q, kind) in CT2_ROWS.items():
        for table, beam in spec["tables"].items():
            out.setdefault(name, {})[table] = best(lambda: ct2_generate(cts[q], inputs[kind], prompt, n_new, beam))
    for name in ("CT2 fp32, unpadded", "CT2 int8, unpadded"):
        q = CT2_ROWS[name][0]
        out[name][ONE_BY_ONE] = best(lambda: [t for m in mels for t in ct2_generate(cts[q], m[None], prompt, n_new, 1)])
    (folder / "ct2.json").write_text(json.dumps(out))


def ct2_measured(folder: Path, model, tok, mels: list, args, tables: dict) -> dict:
    """Export CTranslate2's models, run the child, and return its {row: {table: (s, tokens)}}."""
    import json
    import subprocess
    ct2_export(model, tok, folder)
    var, _ = batch_padded(mels)
    full, _ = batch_padded(mels, 2 * model.dims.n_audio_ctx)
    np.savez(folder / "inputs.npz", var=var.numpy(), full=full.numpy(), **{f"mel{i}": m.numpy() for i, m in enumerate(mels)})
    (folder / "spec.json").write_text(json.dumps({"clips": len(mels), "threads": args.threads, "repeats": args.repeats,
                                                  "max_new_tokens": args.max_new_tokens, "tables": tables,
                                                  "prompt": list(tok.sot_sequence())}))
    subprocess.run([sys.executable, __file__, "--ct2_child", str(folder)], check=True)
    return {name: {t: tuple(v) for t, v in rows.items()} for name, rows in json.loads((folder / "ct2.json").read_text()).items()}


def ct2_export(model, tok, folder: Path) -> None:
    """CTranslate2 exports of `model`: compact fp32 and int8 (our vocabulary) and fp32 in
    faster-whisper's layout ("fw")."""
    for q in ("float32", "int8"):  # our vocabulary size, as the other implementations here
        export_ct2(model, tok, folder / f"ct2_{q}", q, compact=True)
    export_ct2(model, tok, folder / "ct2_fw", "float32")  # faster-whisper's 51,865-token layout


def ct2_load(folder: Path, threads: int) -> dict:
    import ctranslate2
    return {q: ctranslate2.models.Whisper(str(folder / f"ct2_{q}"), device="cpu",
                                          compute_type="int8" if q == "int8" else "float32",
                                          intra_threads=threads, inter_threads=1) for q in ("float32", "int8", "fw")}


def ct2_generate(ct, mel: np.ndarray, prompt: list, n_new: int, beam: int) -> list:
    import ctranslate2
    features = ctranslate2.StorageView.from_array(np.ascontiguousarray(mel))
    # CTranslate2's Whisper max_length: it generates up to max_length // 2 new tokens (measured)
    return [r.sequences_ids[0] for r in ct.generate(features, [prompt] * mel.shape[0], beam_size=beam,
                                                    max_length=2 * n_new, suppress_blank=False)]


def ours_decode(model, tok, n_new: int):
    # loop_span 0: every token to n_new, as the others (the random model loops, which we would cut short)
    return lambda x, x_lens, beam: [r.tokens for r in decode(model, x, x_lens, tok, DecodingOptions(
        beam_size=beam, max_new_tokens=n_new, loop_span=0))]


def make_runners(model, tok, mels, folder: Path, n_new: int, ct2: dict, q8, bf) -> list:
    from transformers import WhisperForConditionalGeneration

    var, lens = batch_padded(mels)
    full, _ = batch_padded(mels, 2 * model.dims.n_audio_ctx)
    export_openai(model, folder / "openai.pt")
    export_hf(model, tok, folder / "hf")
    om = load_openai_model(folder / "openai.pt")
    hf = WhisperForConditionalGeneration.from_pretrained(folder / "hf").eval()
    fp32, int8, bf16 = ours_decode(model, tok, n_new), ours_decode(q8, tok, n_new), ours_decode(bf, tok, n_new)

    def hf_run(beam):
        with torch.inference_mode():
            out = hf.generate(input_features=full, max_new_tokens=n_new, num_beams=beam, do_sample=False)
        return [[t for t in row.tolist() if t < tok.n_text] for row in out]

    padded = "ours, padded to 30 s"  # what the 30 s implementations compute
    runners = [Runner("ours (variable length)", lambda beam: fp32(var, lens, beam)),
               Runner(padded, lambda beam: fp32(full, None, beam)),
               Runner("ours int8", lambda beam: int8(var, lens, beam)),
               Runner("ours bf16", lambda beam: bf16(var, lens, beam)),
               *(Runner(name, None, measured=ct2[name]) for name in ("CT2 fp32, unpadded", "CT2 int8, unpadded")),
               Runner("HF transformers generate", hf_run, padded)]
    for name in ("CT2 fp32, 30 s", "CT2 int8, 30 s", "CT2 fp32, 30 s, fw vocab"):
        runners.append(Runner(name, None, padded, measured=ct2[name]))
    runners.append(Runner("openai-whisper decode", lambda beam: [r.tokens for r in openai_decode(
        om, full, tok, beam_size=beam, max_new_tokens=n_new)], padded))
    return runners


def timed(fn, repeats: int) -> tuple:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--size", default="tiny", help="model preset (mini tiny base ...)")
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--beam_size", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2, help="best of this many runs per setting")
    ap.add_argument("--ct2_child", default=None, help=argparse.SUPPRESS)  # internal: time CTranslate2 alone
    args = ap.parse_args()
    if args.ct2_child:
        return ct2_child(Path(args.ct2_child))
    tok, model = random_model(args.size, args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_clips(Path(tmp), args.clips)
        mels = load_mels(paths, model.dims.n_mels)
        audio_s = sum(m.shape[-1] for m in mels) / 100
        names = {"greedy": 1, f"beam {args.beam_size}": args.beam_size}
        ct2 = ct2_measured(Path(tmp), model, tok, mels, args, names)
        q8, bf = quantize(model, "int8", "cpu"), quantize(copy.deepcopy(model), "bf16", "cpu")
        runners = make_runners(model, tok, mels, Path(tmp), args.max_new_tokens, ct2, q8, bf)
        import ctranslate2
        import transformers
        transformers.logging.set_verbosity_error()  # generate's notes on max_length vs max_new_tokens
        print(f"{len(mels)} clips, {audio_s:.1f} s of audio; model {args.size} ({model.num_parameters() / 1e6:.1f} M "
              f"params, vocab {tok.vocab_size}); {args.max_new_tokens} tokens per clip; {args.threads} threads; "
              f"torch {torch.__version__}, transformers {transformers.__version__}, ctranslate2 {ctranslate2.__version__}")
        tables = {name: report(runners, name, beam, args, audio_s) for name, beam in names.items()}
        tables[ONE_BY_ONE] = report(one_by_one(model, q8, bf, tok, mels, ct2, args.max_new_tokens),
                                    ONE_BY_ONE, 1, args, audio_s)
        print("\nagainst CTranslate2 fed the same unpadded features (their time / ours; targets: fp32 batched >= 1.5, "
              "one by one >= 1.0; int8 >= 1.0)")
        for name, t in tables.items():
            print(f"  {name:<20} fp32 {t['CT2 fp32, unpadded'] / t['ours (variable length)']:.2f}x   "
                  f"int8 {t['CT2 int8, unpadded'] / t['ours int8']:.2f}x   "
                  f"ours bf16 vs CT2 int8 {t['CT2 int8, unpadded'] / t['ours bf16']:.2f}x   "
                  f"ours bf16 vs CT2 fp32 {t['CT2 fp32, unpadded'] / t['ours bf16']:.2f}x")


def one_by_one(model, q8, bf, tok, mels: list, ct2: dict, n_new: int) -> list:
    """Each clip alone at its own length, greedy: per-file latency without batching."""
    def each(run):
        return lambda beam: [t for m in mels for t in run(m[None], beam)]

    ours, int8, bf16 = ours_decode(model, tok, n_new), ours_decode(q8, tok, n_new), ours_decode(bf, tok, n_new)
    return [Runner("ours (variable length)", each(lambda m, beam: ours(m, None, beam))),
            Runner("ours int8", each(lambda m, beam: int8(m, None, beam))),
            Runner("ours bf16", each(lambda m, beam: bf16(m, None, beam))),
            *(Runner(name, None, measured=ct2[name]) for name in ("CT2 fp32, unpadded", "CT2 int8, unpadded"))]


def report(runners: list, name: str, beam: int, args, audio_s: float) -> None:
    for r in runners:  # warm-up (first-call allocations, lazy init), not timed
        if r.measured is None:
            r.run(1)
    print(f"\n{name}: {'implementation':<26} {'seconds':>8} {'RTF':>7} {'tokens/clip':>12} {'same text':>10} "
          f"{'ours is':>9}")
    t_ours, outs, times = None, {}, {}
    for r in runners:
        seconds, out = r.measured[name] if r.measured else timed(lambda: r.run(beam), args.repeats)
        t_ours = t_ours or seconds
        outs[r.name], times[r.name] = out, seconds
        ref = outs.get(r.same_as, out)
        counts = sorted({len(t) for t in out})
        same = sum(a == b for a, b in zip(out, ref))
        print(f"{'':<{len(name) + 1}} {r.name:<26} {seconds:>8.2f} {seconds / audio_s:>7.4f} "
              f"{'/'.join(map(str, counts)):>12} {f'{same}/{len(out)}':>10} {seconds / t_ours:>8.2f}x")
    return times


if __name__ == "__main__":
    main()
