"""Training throughput against Hugging Face transformers' Whisper on this CPU: audio seconds per
second of forward + backward + optimizer step, and peak memory. Same weights, same clips, same
transcripts, same optimizer, same threads.

Clips have Common-Voice-like durations (log-normal, mean ≈ 5.3 s, 1-10.5 s) with random log-mel
features and random character transcripts of ~12 tokens per second (Mongolian speech in our char
vocabulary). Each implementation trains on every clip once (an epoch), after one untimed warm-up
step, with the same padded-seconds budget per batch (--batch_seconds, default 4 × 30 s):

- ours: `DurationBucketSampler` batches (similar lengths, batch size × longest ≤ budget), each
  padded to its longest clip, `mel_lens` masking the padding: the trainer's LossModule;
- ours, padded to 30 s: the same code with every clip padded to 30 s, budget / 30 clips a batch,
  mel_lens None (to separate the padding gain from the implementation's own speed);
- HF: `WhisperForConditionalGeneration(labels=...)` on mels padded to 30 s (its encoder accepts
  nothing else), budget / 30 clips a batch, in the same shuffled order.

Each implementation runs in its own process so its peak memory (ru_maxrss, and the growth over
the RSS before the first step) is its own. Prints audio s/s and our ratio (ours / theirs).

A second table splits the fastest epoch of each row into collation, forward (with the loss),
backward, gradient clipping and the AdamW step; --optimizers runs each implementation with
torch's for-loop (its default for CPU tensors), foreach and fused AdamW; --repeats interleaves several epochs.

    python bench/vs_train.py [--threads 2] [--size tiny] [--clips 96] [--batch_seconds 120]
                             [--impls ours,ours_30s,hf] [--optimizers forloop,foreach,fused] [--repeats 1]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from whisper_scratch.data import DurationBucketSampler, collate  # noqa: E402
from whisper_scratch.model import Whisper, preset_dims  # noqa: E402
from whisper_scratch.tokenizer import CharTokenizer  # noqa: E402
from whisper_scratch.trainer import LossModule  # noqa: E402

MN_LETTERS = "абвгдеёжзийклмнопрстуфхцчшщъыьэюяөү"
IMPLS = ("ours", "ours_30s", "hf")
NAMES = {"ours": "ours (bucketed, variable length)", "ours_30s": "ours, padded to 30 s",
         "hf": "HF transformers, padded to 30 s"}
CHARS_PER_SECOND = 12
PHASES = ("collate", "forward", "backward", "clip", "optimizer")
# torch's three AdamW implementations: a Python loop over tensors, multi-tensor ops, one fused kernel
OPTIMIZERS = {"forloop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def make_items(n: int, n_mels: int, tok, seed: int = 0) -> list:
    """Clips as collate() takes them: {mel (n_mels, T), tokens (prompt + text + eot), ...}."""
    rng = np.random.default_rng(seed)
    sigma = 0.35
    durations = np.clip(rng.lognormal(np.log(5.3) - sigma ** 2 / 2, sigma, n), 1.0, 10.5)
    prompt = list(tok.sot_sequence())
    items = []
    for i, d in enumerate(durations):
        frames = int(d * 100)
        mel = torch.from_numpy((rng.standard_normal((n_mels, frames)) * 0.5).astype(np.float32))
        text = rng.integers(1, tok.n_text, max(1, round(CHARS_PER_SECOND * d))).tolist()
        items.append({"mel": mel, "tokens": prompt + text + [tok.eot], "id": str(i), "index": i})
    return items


def batches_for(impl: str, items: list, batch_seconds: float) -> list:
    """Index lists: bucketed by duration for ours; the same shuffled order, budget / 30 s clips
    a batch, for the 30 s implementations."""
    durations = [it["mel"].shape[-1] / 100 for it in items]
    if impl == "ours":
        # the trainer's default 10 buckets (--num-buckets)
        return list(DurationBucketSampler(durations, batch_seconds, None, num_buckets=10, seed=0))
    per = max(1, int(batch_seconds // 30))
    order = np.random.default_rng(0).permutation(len(items)).tolist()
    return [order[i:i + per] for i in range(0, len(order), per)]


def pad_to(batch: dict, frames: int) -> dict:
    return {**batch, "mel": F.pad(batch["mel"], (0, frames - batch["mel"].shape[-1]))}


def build(impl: str, model: Whisper, tok):
    """(module, step function(batch) -> loss) for one implementation."""
    if impl == "hf":
        from whisper_scratch.export.hf import hf_model

        hf = hf_model(model, tok).train()

        def hf_step(b):
            labels = b["targets"].masked_fill(b["targets"] == tok.pad, -100)  # HF's ignore index
            return hf(input_features=b["mel"], decoder_input_ids=b["tokens_in"], labels=labels).loss
        return hf, hf_step
    loss_module = LossModule(model.train(), tok.pad, tok.n_text, 0.0, 0.0)

    def ours_step(b):
        if impl == "ours":
            ce, _, _ = loss_module(b["mel"], b["mel_lens"], b["tokens_in"], b["targets"])
        else:  # 30 s windows, no mask: openai-whisper's computation in our code
            logits = model(b["mel"], None, b["tokens_in"])
            ce = F.cross_entropy(logits.flatten(0, 1), b["targets"].flatten(), ignore_index=tok.pad, reduction="sum")
        return ce / (b["targets"] != tok.pad).sum()  # the trainer's per-token loss
    return model, ours_step


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args) -> dict:
    """Train one epoch with one implementation; returns its numbers (run in its own process)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = CharTokenizer(MN_LETTERS)
    model = Whisper(preset_dims(args.size, n_vocab=tok.vocab_size))
    items = make_items(args.clips, model.dims.n_mels, tok)
    module, step = build(args.impl, model, tok)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01,
                                  **OPTIMIZERS[args.optimizer])
    frames = 2 * model.dims.n_audio_ctx if args.impl != "ours" else None

    phases = dict.fromkeys(PHASES, 0.0)  # seconds of the timed epoch in each part of a step

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        phases[name] += time.perf_counter() - t
        return out

    def run(indices):
        b = timed("collate", lambda: collate([items[i] for i in indices], tok.pad, len(tok.sot_sequence())))
        b = pad_to(b, frames) if frames else b
        loss = timed("forward", lambda: step(b))
        timed("backward", loss.backward)
        timed("clip", lambda: torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0))
        timed("optimizer", optimizer.step)
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    batches = batches_for(args.impl, items, args.batch_seconds)
    base = rss_mb()
    run(batches[0][:2])  # warm-up: allocator, optimizer state, first-call paths
    phases.update(dict.fromkeys(PHASES, 0.0))  # the warm-up step is not part of the epoch
    t0 = time.perf_counter()
    losses = [run(b) for b in batches]
    seconds = time.perf_counter() - t0
    audio_s = sum(it["mel"].shape[-1] for it in items) / 100
    padded_s = sum(len(b) * (frames or max(items[i]["mel"].shape[-1] for i in b)) for b in batches) / 100
    return {"impl": args.impl, "seconds": seconds, "audio_s": audio_s, "padded_s": padded_s, "steps": len(batches),
            "first_loss": losses[0], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "base_rss_mb": base, "phases": phases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--size", default="tiny", help="model preset (mini tiny base ...)")
    ap.add_argument("--clips", type=int, default=96)
    ap.add_argument("--batch_seconds", type=float, default=120.0, help="padded seconds per batch, all implementations")
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {IMPLS}")
    ap.add_argument("--optimizers", default="forloop", help=f"comma-separated AdamW implementations of "
                    f"{tuple(OPTIMIZERS)}: each implementation runs with each (on CPU tensors torch defaults to "
                    f"forloop)")
    ap.add_argument("--repeats", type=int, default=1, help="epochs per implementation, each in a new process, "
                    "the implementations taking turns; the table shows the fastest and the median")
    ap.add_argument("--optimizer", default="forloop", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)  # internal: run one implementation, print JSON
    args = ap.parse_args()
    if args.impl:
        print(json.dumps(worker(args)))
        return
    runs = {}  # (impl, optimizer) -> results of its repeats
    for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every row
        for impl in args.impls.split(","):
            for opt in args.optimizers.split(","):
                if opt not in OPTIMIZERS:
                    raise SystemExit(f"--optimizers: {opt!r} is not one of {tuple(OPTIMIZERS)}")
                cmd = [sys.executable, __file__, "--impl", impl, "--optimizer", opt, "--threads", str(args.threads),
                       "--size", args.size, "--clips", str(args.clips), "--batch_seconds", str(args.batch_seconds)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                runs.setdefault((impl, opt), []).append(json.loads(out.strip().splitlines()[-1]))
    print_table(runs, args)


def print_table(runs: dict, args) -> None:
    """One row per (implementation, optimizer): the fastest of its repeats (and the median), then
    the seconds of each phase in that fastest epoch, so a gap between rows can be located."""
    first = next(iter(runs.values()))[0]
    print(f"{args.clips} clips, {first['audio_s']:.1f} s of audio (mean {first['audio_s'] / args.clips:.2f} s); model "
          f"{args.size}; budget {args.batch_seconds:g} padded s per batch; {args.threads} threads; "
          f"{args.repeats} epoch(s) per row; torch {torch.__version__}")
    print(f"{'implementation':<34} {'AdamW':>8} {'steps':>5} {'padded s':>9} {'seconds':>8} {'median':>7} "
          f"{'audio s/s':>10} {'peak RSS MB':>12} {'growth MB':>10} {'ours is':>8}")
    best = {key: min(rs, key=lambda r: r["seconds"]) for key, rs in runs.items()}
    speed0 = first["audio_s"] / best[next(iter(runs))]["seconds"]
    for (impl, opt), r in best.items():
        speed = r["audio_s"] / r["seconds"]
        median = float(np.median([x["seconds"] for x in runs[(impl, opt)]]))
        print(f"{NAMES[impl]:<34} {opt:>8} {r['steps']:>5} {r['padded_s']:>9.0f} {r['seconds']:>8.1f} {median:>7.1f} "
              f"{speed:>10.2f} {r['peak_rss_mb']:>12.0f} {r['peak_rss_mb'] - r['base_rss_mb']:>10.0f} "
              f"{speed0 / speed:>7.2f}x")
    print(f"\nseconds per phase of the fastest epoch ({', '.join(PHASES)}):")
    for (impl, opt), r in best.items():
        print(f"{NAMES[impl]:<34} {opt:>8} " + " ".join(f"{r['phases'][p]:>9.2f}" for p in PHASES))


if __name__ == "__main__":
    main()
