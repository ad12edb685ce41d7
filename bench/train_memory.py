"""Peak GPU memory and training throughput of tiny and small under each 6 GB script's flags.

    python bench/train_memory.py [--sizes tiny small] [--cap-gb 6] [--steps 4]

The flags are read from run_6gb.sh and run_6gb_lowmem.sh themselves, and the real Trainer runs
its real optimizer step on worst-case batches: clips of 30 s filling the padded-seconds budget
(the largest encoder input the sampler can produce). On a GPU the process is capped to --cap-gb
with torch.cuda.set_per_process_memory_fraction, so "OOM" means the flags do not fit a 6 GB card.
On a CPU (no GPU) it runs in fp32 and reports throughput only.
"""
import argparse
import re
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from whisper_scratch.config import parse_options  # noqa: E402
from whisper_scratch.data import Collator  # noqa: E402
from whisper_scratch.trainer import Trainer, TrainOptions  # noqa: E402


def script_flags(script: Path) -> list:
    """The train.py flags of a run script, with ${VAR:-default} replaced by the default."""
    text = script.read_text().replace("\\\n", " ")
    line = next(l for l in text.splitlines() if l.lstrip().startswith("\"$PY\" train.py"))
    line = re.sub(r'"?\$\{\w+:-([^}]*)\}"?', r"\1", line.split("train.py", 1)[1]).replace('"$@"', "")
    flags = shlex.split(line)
    # drop the data/output flags: the bench supplies its own
    out, skip = [], False
    for f in flags:
        if skip:
            skip = False
            continue
        if f in ("--local-data-dir", "--output-dir", "--whisper-size"):
            skip = True
            continue
        out.append(f)
    return out


def make_corpus(folder: Path, n: int, seconds: float) -> str:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        path = folder / f"clip{i}.wav"
        sf.write(path, (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32), 16000)
        text = " ".join("сайн байна уу" for _ in range(8))  # ~100 characters: a long CV sentence
        rows.append(f"{path}\t{text}\ttrain\n{path}\t{text}\tdev\n")
    manifest = folder / "m.tsv"
    manifest.write_text("path\ttext\tsplit\n" + "".join(rows))
    return str(manifest)


def measure(size: str, flags: list, manifest: str, out: str, steps: int, cuda: bool) -> dict:
    opts = parse_options(TrainOptions, flags + ["--local-data-dir", manifest, "--output-dir", out,
                                                "--whisper-size", size, "--num-workers", "0", "--no-progress",
                                                "--train-split", "train", "--dev-split", "dev",
                                                "--max-steps", "1000"])
    if not cuda:
        opts = replace(opts, dtype="fp32", device="cpu", optimizer="adamw")
    t = Trainer(opts)
    per_batch = max(1, int(opts.max_batch_seconds // 30))
    collate = Collator(t.tokenizer)
    micro = [collate([t.dataset[i % len(t.dataset)] for i in range(per_batch)]) for _ in range(opts.grad_accum)]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        t.step(micro)  # warm-up (allocator, cuDNN autotune, optimizer state)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            t.step(micro)
        if cuda:
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / steps
    except torch.cuda.OutOfMemoryError:
        return {"peak_gb": float("nan"), "audio_s_per_s": float("nan"), "status": "OOM"}
    audio = sum(float(b["mel_lens"].sum()) for b in micro) / 100
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return {"peak_gb": peak, "audio_s_per_s": audio / dt, "status": "ok", "step_audio_s": audio,
            "params_m": t.model.num_parameters() / 1e6}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    ap.add_argument("--cap-gb", type=float, default=6.0)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * 2**30 / total))
        print(f"GPU {torch.cuda.get_device_name(0)}, process capped to {args.cap_gb} GB")
    else:
        print("no GPU: fp32 on CPU, plain AdamW; throughput only (peak GPU memory needs a GPU)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_corpus(Path(tmp), 8, 30.0)
        for script in ("run_6gb.sh", "run_6gb_lowmem.sh"):
            flags = script_flags(REPO / script)
            for size in args.sizes:
                r = measure(size, flags, manifest, f"{tmp}/out_{script}_{size}", args.steps, cuda)
                rows.append((script, size, r))
                print(f"{script:20s} {size:6s} {r['status']:4s} peak {r['peak_gb']:6.2f} GB  "
                      f"{r['audio_s_per_s']:8.1f} audio s/s  ({' '.join(flags)})", flush=True)
    print("\n| script | size | peak GPU memory (GB) | audio s / s | status |\n|---|---|---|---|---|")
    for script, size, r in rows:
        print(f"| {script} | {size} | {r['peak_gb']:.2f} | {r['audio_s_per_s']:.1f} | {r['status']} |")


if __name__ == "__main__":
    main()
