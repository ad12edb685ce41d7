"""Load test of the transcription server: 64 requests from 16 concurrent `openai` clients vs the
same 64 requests one at a time, against a server this script starts (a subprocess, so the
clients do not share its interpreter; the clients are `openai.AsyncOpenAI` in one thread).

  python bench/server_load.py [--model_path exp/demo_mn/best_model.pt]
                              [--reference_file data/synth_mn/mn/test.tsv] [--audio_dir data/synth_mn/mn/clips]
                              [--n_requests 64] [--concurrency 16] [-- SERVER FLAGS, e.g. --max_new_tokens 8]

Files: those the reference TSV names (found under --audio_dir), or with --reference_file none
every audio file under --audio_dir, repeated if there are fewer than --n_requests. Flags after
`--` go to the server (whisper_scratch.server) and are parsed here with the same ServerOptions,
so the reference transcripts come from the library with exactly the server's options:
`transcribe_files` with voice-activity chunks, each file alone for the one-at-a-time run (what
transcribe.py --mode single gives) and in batches for the concurrent ones (--mode batch); with
--quantize bf16 a few may differ (bf16 rounding depends on the batch; and a --continuous true
server decodes in bf16 throughout, where the library decodes few rows with its fp32 decoder copy). Checks
that every answer equals its reference and that none is lost; prints throughput (requests/s,
audio s/s) of both runs, their ratio (target >= 3x) and p50/p95 latency. With --other_mode (the
default) the concurrent load also goes to a second server with the other `--continuous` setting
(batches that start and end together, or continuous batching), to compare both in one command.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import httpx
import numpy as np
import openai
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from whisper_scratch.audio import AUDIO_EXTENSIONS, audio_duration  # noqa: E402
from whisper_scratch.checkpoint import load_model  # noqa: E402
from whisper_scratch.config import option, parse_options, require  # noqa: E402
from whisper_scratch.evaluation import resolve_references  # noqa: E402
from whisper_scratch.longform import transcribe_files  # noqa: E402
from whisper_scratch.checkpoint import precision, quantize  # noqa: E402
from whisper_scratch.server import ServerOptions  # noqa: E402
from whisper_scratch.vad import with_checkpoint_chunks  # noqa: E402


@dataclass(frozen=True)
class LoadOptions:
    """Throughput of the server under 16 concurrent clients vs one at a time."""

    model_path: str = option("exp/demo_mn/best_model.pt", "checkpoint to serve")
    reference_file: Optional[str] = option("data/synth_mn/mn/test.tsv", "TSV naming the files to send "
                                           "(none: every audio file under --audio_dir)")
    audio_dir: str = option("data/synth_mn/mn/clips", "folder of the audio files")
    n_requests: int = option(64, "requests per run")
    concurrency: int = option(16, "concurrent clients in the loaded run")
    startup_s: float = option(300.0, "how long to wait for the server to answer /health")
    other_mode: bool = option(True, "also send the concurrent load to a server with the other --continuous setting")

    def __post_init__(self):
        require(self.n_requests >= 1, f"n_requests must be >= 1, got {self.n_requests}")
        require(self.concurrency >= 1, f"concurrency must be >= 1, got {self.concurrency}")


def missing_inputs(opts: LoadOptions) -> list:
    """What the run needs and does not have, each said plainly."""
    missing = []
    if not Path(opts.model_path).is_file():
        missing.append(f"--model_path {opts.model_path}: no such checkpoint (train one, or pass any checkpoint)")
    if opts.reference_file and not Path(opts.reference_file).is_file():
        missing.append(f"--reference_file {opts.reference_file}: no such file (make the demo corpus, or pass "
                       "--reference_file none with an --audio_dir)")
    if not Path(opts.audio_dir).is_dir():
        missing.append(f"--audio_dir {opts.audio_dir}: no such folder")
    return missing


def request_files(opts: LoadOptions) -> list:
    """n_requests audio paths: the reference's files that exist (else the folder's), cycled."""
    if opts.reference_file:
        refs, _ = resolve_references(opts.reference_file, opts.audio_dir)
        paths = sorted(p for p in refs if Path(p).is_file())
    else:
        paths = sorted(str(p) for p in Path(opts.audio_dir).rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)
    paths = paths[:opts.n_requests]
    return [paths[i % len(paths)] for i in range(opts.n_requests)] if paths else []


def references(server: ServerOptions, paths: list) -> Tuple[dict, dict]:
    """({path: text} in batches, {path: text} each file alone) from the library with the server's
    options and its chunk-length rule: what `transcribe.py --mode batch` and `--mode single` give.
    In fp32 the two agree; with --quantize bf16 a text can depend on the batch (rounding, and the
    fp32 decoder copy that searches of few rows run)."""
    device = server.device or ("cuda" if torch.cuda.is_available() else "cpu")  # the server's rules
    model, tokenizer, ckpt = load_model(server.model_path, device)
    model = quantize(model, server.quantize, device)
    vad = with_checkpoint_chunks(server.vad, ckpt)
    files = sorted(set(paths))

    def texts(groups) -> dict:
        return {p: r if isinstance(r, Exception) else r["text"] for group in groups
                for p, r in transcribe_files(model, group, tokenizer, server.decoding, server.fallback,
                                             server.batch_size, vad=vad)}
    with precision(server.dtype, device):
        return texts([files]), texts([[p] for p in files])


@contextlib.contextmanager
def serving(server_argv: list, startup_s: float):
    """The base url of a server started for the with-block (a subprocess), stopped after."""
    proc, base = start_server(server_argv, startup_s)
    try:
        yield base
    finally:
        proc.terminate()
        proc.wait(30)


def start_server(server_argv: list, startup_s: float):
    """The server in a subprocess on a free port; (process, base url) once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"server_load_{port}.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "whisper_scratch.server", *server_argv, "--port", str(port)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + startup_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    log.seek(0)
    raise SystemExit(f"the server did not start (log {log.name}):\n{log.read()[-3000:]}")


async def one(client, path: str):
    """(text or the error, latency in s) of one request."""
    t0 = time.perf_counter()
    try:
        with open(path, "rb") as f:
            text = (await client.audio.transcriptions.create(model="whisper-1", file=f)).text
    except openai.OpenAIError as e:
        text = e
    return text, time.perf_counter() - t0


async def send_all(base: str, paths: list, concurrency: int, api_key: Optional[str]) -> list:
    """Every path sent by `concurrency` clients (one AsyncOpenAI client each, each sending its
    next file when its last answer came), in one thread: 16 client threads of the sync client
    would take CPU from the server they measure on the same two cores."""
    clients = [openai.AsyncOpenAI(base_url=base + "/v1", api_key=api_key or "none", max_retries=0, timeout=600)
               for _ in range(concurrency)]
    todo = iter(enumerate(paths))
    done = [None] * len(paths)

    async def client_loop(client):
        for i, path in todo:  # a shared iterator: each file goes to the next free client
            done[i] = await one(client, path)

    try:
        await asyncio.gather(*(client_loop(c) for c in clients))
    finally:
        for c in clients:
            await c.close()
    return done


def run(base: str, paths: list, concurrency: int, api_key: Optional[str]) -> dict:
    """Send every path with `concurrency` concurrent clients; answers in order."""
    before = httpx.get(base + "/health").json()["decoded"]
    t0 = time.perf_counter()
    done = asyncio.run(send_all(base, paths, concurrency, api_key))
    wall = time.perf_counter() - t0
    after = httpx.get(base + "/health").json()["decoded"]
    per_batch = (after["requests"] - before["requests"]) / max(1, after["batches"] - before["batches"])
    steps = after["steps"] - before["steps"]
    return {"wall": wall, "answers": [a for a, _ in done], "latency": np.array([t for _, t in done]),
            "per_batch": per_batch, "decoding": after["seconds"] - before["seconds"],
            "rows": (after["rows"] - before["rows"]) / steps if steps else float("nan")}


def summary(name: str, r: dict, audio_s: float) -> str:
    p50, p95 = np.percentile(r["latency"], [50, 95])
    n = len(r["answers"])
    return (f"| {name} | {r['wall']:.2f} | {n / r['wall']:.2f} | {audio_s / r['wall']:.2f} | "
            f"{p50:.3f} | {p95:.3f} | {r['per_batch']:.1f} | {r['rows']:.1f} | {r['decoding']:.2f} |")


def check(name: str, answers: list, paths: list, refs: dict) -> list:
    """A line per answer that is lost (an error) or differs from the library's transcript."""
    bad = []
    for path, got in zip(paths, answers):
        if isinstance(got, Exception):
            bad.append(f"{name}: {path}: lost ({type(got).__name__}: {got})")
        elif got != refs[path]:
            bad.append(f"{name}: {path}: got {got!r}, transcribe gives {refs[path]!r}")
    return bad


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    opts = parse_options(LoadOptions, argv[:cut], prog="bench/server_load.py")
    missing = missing_inputs(opts)
    if missing:
        print("cannot run the load test:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 2
    paths = request_files(opts)
    if not paths:
        print(f"no audio files found for {opts.reference_file or opts.audio_dir}", file=sys.stderr)
        return 2
    server_argv = ["--model_path", str(Path(opts.model_path).resolve()), *argv[cut + 1:]]  # the server runs in REPO
    server = parse_options(ServerOptions, server_argv, prog="whisper_scratch.server")
    audio_s = sum(audio_duration(p) for p in paths)
    print(f"{len(paths)} requests over {len(set(paths))} files, {audio_s:.1f} s of audio per run; "
          f"server: {' '.join(server_argv)}", flush=True)
    batched, alone = references(server, paths)
    runs = {}
    with serving(server_argv, opts.startup_s) as base:
        run(base, paths[:1], 1, server.api_key)  # warm-up: the VAD model and first-call allocations
        runs["one at a time"] = run(base, paths, 1, server.api_key)
        runs[f"{opts.concurrency} concurrent clients"] = run(base, paths, opts.concurrency, server.api_key)
    if opts.other_mode:
        other = "false" if server.continuous else "true"
        with serving(server_argv + ["--continuous", other], opts.startup_s) as base:
            run(base, paths[:1], 1, server.api_key)
            runs[f"{opts.concurrency} concurrent clients, --continuous {other}"] = run(base, paths, opts.concurrency,
                                                                                       server.api_key)
    # one at a time, a request is decoded alone, as --mode single does; concurrent ones share batches
    problems = [line for name, r in runs.items()
                for line in check(name, r["answers"], paths, alone if name == "one at a time" else batched)]
    sequential, *loaded = runs.values()
    print(f"\n## server load: {opts.n_requests} requests, {opts.model_path}\n")
    print("| run | wall s | requests/s | audio s/s | p50 latency s | p95 latency s | requests per batch | "
          "chunks per decoder step | worker decoding s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        print(summary(name, r, audio_s))
    print()
    for name, r in list(runs.items())[1:]:
        print(f"throughput ratio ({name} / one at a time): {sequential['wall'] / r['wall']:.2f}x (target >= 3x)")
    n = len(runs) * len(paths)
    answered = sum(not isinstance(a, Exception) for r in runs.values() for a in r["answers"])
    print(f"answers: {answered}/{n} answered, {n - len(problems)}/{n} equal to the library's transcript with the "
          f"server's options (one at a time: each file alone, as transcribe.py --mode single; concurrent: "
          f"transcribe_files in batches of {server.batch_size}, as --mode batch)")
    for line in problems[:20]:
        print("  " + line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
