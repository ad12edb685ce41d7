"""An OpenAI-compatible transcription server:

  python -m whisper_scratch.server --model_path OUT/best_model.pt --port 8000
  POST /v1/audio/transcriptions  (multipart: file, model, language, prompt, temperature,
                                  response_format, timestamp_granularities[])
  GET  /v1/models, GET /health

One worker thread owns the model and runs all torch work, silero included: torch's OpenMP (libgomp)
stops spin-waiting once more threads than cores have thread teams, and a second thread running torch
(silero on the uploads, say, or --quantize's conversion on 2 threads in the main thread) made every
decoder step 3-4.5x slower (measured). Requests wait in a queue. By default the worker takes what
has arrived, up to --batch_size chunks, while busy waits up to --max_wait_ms for more, and decodes
requests with the same options together through longform.transcribe_chunks: batches that start and
end together, each request answered as soon as its chunks are final (the few that fall back to
sampling are decoded again after the others are answered). With --continuous true, greedy
requests are decoded with continuous batching instead (longform.ChunkStream): their chunks join
the running batch at a decoder step and leave it when they end, so a short request is not held
up by a long one (bench/server_load.py, 16 clients of short clips: p95 latency 2.1 s against
2.9 s, but 1.27x less throughput, as every join pays silero and the encoder for a few files).
The event loop only parses uploads and formats replies. The `model` field is accepted whatever
it says (clients written for "whisper-1" work unchanged); /v1/models lists --model_name. Errors
use OpenAI's JSON shape {"error": {message, type, param, code}}, so the openai client raises
BadRequestError etc.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import secrets
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from .audio import SAMPLE_RATE, AudioError, one_line_audio_warnings, read_audio
from .checkpoint import check_device, check_quantize, load_model, precision, quantize, quantize_option
from .config import DTYPE_ALIASES, canonical_dtype, option, parse_options, require
from .decoding import DecodingOptions, FallbackOptions, with_language_model
from .longform import ChunkStream, chunk_limit, transcribe_chunks
from .vad import VadOptions, with_checkpoint_chunks
from .writers import to_srt, to_txt, to_vtt

log = logging.getLogger("whisper_scratch.server")
FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("word", "segment")
MB = 1 << 20
FORM_SLACK = 64 << 10  # room for the text fields and multipart headers beside the file


@dataclass(frozen=True)
class ServerOptions:
    """Serve a whisper_scratch checkpoint through OpenAI's /v1/audio/transcriptions API."""

    model_path: str = option(help="checkpoint written by train.py, e.g. OUT/best_model.pt")
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = option(8000, "TCP port")
    model_name: str = option("whisper-scratch", "the model id /v1/models lists (any `model` field is accepted)")
    batch_size: int = option(16, "chunks decoded together")
    continuous: bool = option(False, "continuous batching for greedy requests: a chunk joins the running batch at a "
                                     "decoder step and leaves it when it ends (lower p95 latency, less throughput "
                                     "on short clips; false: batches that start and end together)")
    max_wait_ms: float = option(60.0, "while the server is busy, how long a batch waits to fill up (an idle "
                                       "server decodes a lone request at once)")
    max_upload_mb: float = option(25.0, "largest accepted upload in MiB (413 above; OpenAI's limit is 25)")
    api_key: Optional[str] = option(None, "if set, /v1 requests need 'Authorization: Bearer KEY'")
    device: Optional[str] = option(None, "cpu, cuda, cuda:1, ... (default: cuda if available)")
    quantize: Optional[str] = quantize_option()
    dtype: Optional[str] = option(None, "float32 | float16 | bfloat16, or fp32 | fp16 | bf16 (default: float16 on "
                                        "cuda, else float32)",
                                  choices=tuple(DTYPE_ALIASES))
    decoding: DecodingOptions = option(help="default search settings", factory=lambda: DecodingOptions(best_of=5))
    fallback: FallbackOptions = option(help="temperature fallback", factory=FallbackOptions)
    vad: VadOptions = option(help="voice-activity chunks (--chunk_seconds, ...)", factory=VadOptions)

    def __post_init__(self):
        require(Path(self.model_path).is_file(), f"--model_path {self.model_path}: "
                + ("a folder, not a checkpoint file" if Path(self.model_path).is_dir() else "no such file"))
        require(0 <= self.port <= 65535, f"port must be in 0..65535, got {self.port}")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(self.max_wait_ms >= 0, f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        require(self.max_upload_mb > 0, f"max_upload_mb must be > 0, got {self.max_upload_mb}")
        require(self.vad.vad, "the server decodes voice-activity chunks in batches; --vad false (prompted 30 s "
                              "windows, one file at a time) is transcribe.py's")
        object.__setattr__(self, "dtype", check_quantize(self.quantize, canonical_dtype(self.dtype)))


class ApiError(Exception):
    """A request the server refuses: HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_response(status: int, message: str, param=None, code=None, type="invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status)


# -- the decoding worker -----------------------------------------------------------------------

@dataclass
class Job:
    audio: np.ndarray
    key: tuple  # (DecodingOptions, word_timestamps): only equal keys share a transcribe_chunks call
    chunks: int  # about how many chunks the audio will be cut into (what --batch_size counts)
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    abandoned: bool = False  # the client went away: skip it if not started


class Batcher:
    """A queue of jobs and the one thread that decodes them. Jobs whose key has a stream
    (`new_stream(key)`: a longform.ChunkStream, greedy decoding) join it and are decoded with
    continuous batching, one token per step for everything in flight; the others are decoded a
    batch at a time by `decode(key, audios)`, which yields (index, result or Exception) for every
    audio, each as soon as it is done (answered at once).
    An exception raised inside either fails those requests only, never the thread."""

    def __init__(self, decode: Callable[[tuple, list], Iterable[tuple]], batch_size: int, max_wait_s: float,
                 new_stream: Callable[[tuple], Optional[ChunkStream]] = lambda key: None,
                 context: Callable = contextlib.nullcontext):
        self.decode, self.batch_size, self.max_wait_s, self.new_stream = decode, batch_size, max_wait_s, new_stream
        self.context = context  # entered around all decoding work (autocast for --dtype)
        self.queue: queue.Queue = queue.Queue()
        self.streams: dict = {}  # DecodingOptions -> ChunkStream
        self.in_stream: dict = {}  # key given to the stream -> its Job
        # /health: how well requests share batches, and how much of the wall time the worker decodes
        # (continuous batching: steps run and the chunks they decoded, summed)
        self.decoded = {"requests": 0, "batches": 0, "seconds": 0.0, "steps": 0, "rows": 0}
        self.arriving = 0  # requests being uploaded or read, not yet queued (changed on the event loop)
        self.last_batch = 0  # requests in the previous batch
        self.thread = threading.Thread(target=self._run, name="whisper-decoder", daemon=True)

    def submit(self, audio: np.ndarray, key: tuple, chunks: int) -> Job:
        loop = asyncio.get_running_loop()
        job = Job(audio, key, chunks, loop.create_future(), loop)
        self.queue.put(job)
        return job

    def close(self) -> None:
        self.queue.put(None)  # finish what is queued, then stop
        self.thread.join()

    def _collect(self) -> Optional[list]:
        """The next batch: the first job to arrive, what is queued behind it, and while the server
        is busy (the last batch was shared, or requests are being uploaded) whatever comes within
        max_wait_s, up to batch_size chunks. A lone client never waits; a crowd's returning
        clients get into the same batch instead of alternating in half-full ones.
        While a stream is decoding it never waits: whatever is queued (maybe nothing) joins at the
        next step. None once close() was called and the queue is empty."""
        if self._streaming():
            return self._drain()
        first = self.queue.get()
        if first is None:
            return None
        jobs, deadline = [first], time.monotonic() + self.max_wait_s
        while sum(j.chunks for j in jobs) < self.batch_size:
            busy = self.last_batch > 1 or self.arriving > 0
            try:
                job = self.queue.get(timeout=max(0.0, deadline - time.monotonic())) if busy else \
                    self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.queue.put(None)  # stop after this batch
                break
            jobs.append(job)
        return jobs

    def _streaming(self) -> bool:
        return any(stream.busy for stream in self.streams.values())

    def _drain(self) -> list:
        jobs = []
        with contextlib.suppress(queue.Empty):
            while (job := self.queue.get_nowait()) is not None:
                jobs.append(job)
            self.queue.put(None)  # close() was called: stop once the streams are done
        return jobs

    def _run(self) -> None:
        while (jobs := self._collect()) is not None:
            if jobs:
                self.last_batch = len(jobs) + sum(s.files for s in self.streams.values())
            groups: dict = {}
            for job in jobs:
                if not job.abandoned:
                    groups.setdefault(job.key, []).append(job)
            for key, group in groups.items():
                self.begin(key, group)
            for stream in list(self.streams.values()):
                if stream.busy:
                    self._timed(self._step, stream)

    def begin(self, key: tuple, group: list) -> None:
        """Take up requests with equal keys: join their stream, or decode them as a batch."""
        self.decoded["requests"] += len(group)
        self.decoded["batches"] += 1
        if key[0] not in self.streams and (stream := self.new_stream(key)) is not None:
            self.streams[key[0]] = stream
        stream = self.streams.get(key[0])
        if stream is not None:
            words = key[1]
            for job in group:
                self.in_stream[id(job)] = job
            stream.submit([(id(job), job.audio, words) for job in group])  # queued: they start at a step
            return
        waiting = dict(enumerate(group))
        try:
            # answered one by one as each is done: a batch's few fallback chunks no longer hold
            # back the others' clients, who send their next requests meanwhile
            self._timed(self._decode_answering, key, [j.audio for j in group], waiting)
        except Exception as e:  # e.g. out of memory: what is left of this group fails, the server goes on
            log.exception("decoding a batch of %d failed", len(group))
            for job in waiting.values():
                _answer(job, e)

    def _decode_answering(self, key: tuple, audios: list, waiting: dict) -> None:
        for i, result in self.decode(key, audios):
            _answer(waiting.pop(i), result)
        if waiting:  # a decode that skipped an audio is a bug; its client still gets an answer
            raise RuntimeError(f"the decoder returned no result for {len(waiting)} of {len(audios)} requests")

    def _step(self, stream: ChunkStream) -> None:
        self.decoded["steps"] += 1
        self.decoded["rows"] += min(self.batch_size, len(stream.running) + len(stream.waiting))
        try:
            done = stream.step()
        except Exception as e:  # everything in this stream fails; the next requests start afresh
            log.exception("a decoding step failed")
            done = stream.abort(e)
        self._answer_done(done)

    def _answer_done(self, done: list) -> None:
        for key, result in done:
            _answer(self.in_stream.pop(key), result)

    def _timed(self, fn, *args):
        start = time.perf_counter()
        try:
            with self.context():
                return fn(*args)
        finally:
            self.decoded["seconds"] += time.perf_counter() - start


def _answer(job: Job, result) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
        job.loop.call_soon_threadsafe(_settle, job.future, result)


def _settle(future: asyncio.Future, result) -> None:
    if not future.done():
        future.set_exception(result) if isinstance(result, BaseException) else future.set_result(result)


# -- requests ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Asked:
    """What one request asks for, validated."""

    options: DecodingOptions
    response_format: str
    words: bool
    segments: bool


def parse_fields(form, defaults: DecodingOptions, tokenizer, has_ctc: bool) -> Asked:
    """The form's text fields -> Asked, or ApiError(400) naming the bad field. Per-request
    temperature, prompt and language replace the server's defaults."""
    fmt = form.get("response_format") or "json"
    if fmt not in FORMATS:
        raise ApiError(400, f"response_format must be one of {', '.join(FORMATS)}, got {fmt!r}", "response_format")
    grains = form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
    bad = [g for g in grains if g not in GRANULARITIES]
    if bad:
        raise ApiError(400, f"timestamp_granularities must be word and/or segment, got {bad}", "timestamp_granularities")
    if grains and fmt != "verbose_json":
        raise ApiError(400, "timestamp_granularities needs response_format=verbose_json", "timestamp_granularities")
    if "word" in grains and not has_ctc:
        raise ApiError(400, "word timestamps come from a CTC head; this server's model has none", "timestamp_granularities")
    if str(form.get("stream", "false")).lower() == "true":
        raise ApiError(400, "streaming transcription is not supported", "stream")
    options = defaults
    language = form.get("language") or None
    if language is not None:
        if language not in tokenizer.languages:
            raise ApiError(400, f"language {language!r} is not one of the model's languages {list(tokenizer.languages)}",
                           "language", "unsupported_language")
        options = replace(options, language=language)
    if form.get("temperature") not in (None, ""):
        try:
            t = float(form.get("temperature"))
        except ValueError:
            t = math.nan
        if not 0 <= t <= 1:
            raise ApiError(400, f"temperature must be a number from 0 to 1, got {form.get('temperature')!r}",
                           "temperature")
        options = options.at_temperature(t)  # sampling drops the beam settings
    if form.get("prompt"):
        options = replace(options, prompt=tuple(tokenizer.encode(form.get("prompt"))))
    return Asked(options, fmt, "word" in grains, "segment" in grains or not grains)


async def read_form(request: Request, limit_mb: float):
    """The multipart form, read through a byte counter: 413 as soon as Content-Length or the
    count passes `limit`, so an oversized upload is never taken in whole. Starlette spools the
    file part to disk past 1 MiB."""
    limit = int(limit_mb * MB)
    too_large = ApiError(413, f"the upload is larger than this server's limit of {limit_mb:g} MiB "
                              f"(--max_upload_mb)", "file", "file_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + FORM_SLACK:
        raise too_large
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "the request body must be multipart/form-data with a 'file' field")

    async def counted():
        n = 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit + FORM_SLACK:
                raise too_large
            yield chunk
    try:
        return await MultiPartParser(request.headers, counted(), max_files=1, max_fields=32).parse()
    except MultiPartException as e:
        raise ApiError(400, f"malformed multipart body: {e.message}") from None


def load_upload(upload: UploadFile) -> np.ndarray:
    """16 kHz samples of the uploaded file (decoded from a temporary copy that keeps its suffix,
    since soundfile reads paths); AudioError messages name the upload, not the copy."""
    name = upload.filename or "upload"
    with tempfile.NamedTemporaryFile(suffix=Path(name).suffix[:16]) as tmp:
        upload.file.seek(0)
        shutil.copyfileobj(upload.file, tmp)
        tmp.flush()
        try:
            audio, short = read_audio(tmp.name)  # uploads load in threads: no warnings-module state
        except AudioError as e:
            raise ApiError(400, str(e).replace(tmp.name, name), "file", "invalid_audio") from None
        if short:  # a truncated upload is decoded as far as it goes, and logged under its own name
            log.warning("%s: %s", name, short)
        return audio


async def wait_for(job: Job, request: Request):
    """The job's result, unless the client disconnects first: then it is marked abandoned (the
    worker skips it if it has not started) and ClientDisconnect is raised. A decoding error is
    an ApiError: 400 for what the library says of the input, else 500."""
    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({job.future, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not job.future.done():
        job.abandoned = True
        raise ClientDisconnect()
    try:
        return job.future.result()
    except (AudioError, ValueError) as e:  # the library's word on this input (e.g. no usable samples)
        raise ApiError(400, str(e), "file", "invalid_audio") from None
    except Exception as e:  # the worker has logged the traceback; the client gets one line
        raise ApiError(500, f"decoding failed: {type(e).__name__}: {e}", type="server_error") from None


# -- responses ---------------------------------------------------------------------------------

SEGMENT_KEYS = ("id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob", "compression_ratio",
                "no_speech_prob")


def render(result: dict, asked: Asked) -> Response:
    fmt = asked.response_format
    if fmt in ("text", "srt", "vtt"):
        return PlainTextResponse({"text": to_txt, "srt": to_srt, "vtt": to_vtt}[fmt](result))
    usage = {"type": "duration", "seconds": result["duration"]}
    if fmt == "json":
        return JSONResponse({"text": result["text"], "usage": usage})
    body = {"task": "transcribe", "language": result["language"], "duration": result["duration"],
            "text": result["text"], "usage": usage}
    if asked.segments:
        body["segments"] = [{k: s[k] for k in SEGMENT_KEYS} for s in result["segments"]]
    if asked.words:
        body["words"] = [{k: w[k] for k in ("word", "start", "end")}
                         for s in result["segments"] for w in s.get("words", [])]
    return JSONResponse(body)


# -- the app -----------------------------------------------------------------------------------

def create_app(opts: ServerOptions) -> FastAPI:
    """Load the model and build the app; the worker runs while the app is served."""
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    model, tokenizer, ckpt = load_model(opts.model_path, device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # converting the weights here on 2 threads would give this thread an OpenMP
    try:                      # team, and the worker's decoding would run 4.5x slower (module docstring)
        model = quantize(model, opts.quantize, device)
    finally:
        torch.set_num_threads(threads)
    vad = with_checkpoint_chunks(opts.vad, ckpt)
    require(opts.decoding.language in (None, *tokenizer.languages),  # fail at start, not on every request
            f"--language {opts.decoding.language!r} is not one of the model's languages {tokenizer.languages}")
    require(opts.decoding.ctc_weight == 0 or model.dims.ctc, "--ctc_weight needs a model with a CTC head")
    # --lm_path loaded once, here: a bad file stops the start-up; every request's options carry it
    opts = replace(opts, decoding=with_language_model(opts.decoding, tokenizer, model.dims.n_vocab))
    chunk_s = chunk_limit(model, vad)

    def decode(key: tuple, audios: list) -> Iterator[tuple]:
        options, words = key
        return transcribe_chunks(model, list(enumerate(audios)), tokenizer, options, opts.fallback, vad,
                                 opts.batch_size, words, in_order=False)

    def streamed(options: DecodingOptions) -> bool:  # beam search and sampling go a batch at a time
        return opts.continuous and options.temperature == 0 and not options.uses_beam_search

    def new_stream(key: tuple) -> Optional[ChunkStream]:
        return ChunkStream(model, tokenizer, key[0], opts.fallback, vad, opts.batch_size) if streamed(key[0]) else None

    batcher = Batcher(decode, opts.batch_size, opts.max_wait_ms / 1000, new_stream,
                      context=lambda: precision(opts.dtype, device))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.thread.start()
        yield
        await asyncio.to_thread(batcher.close)

    app = FastAPI(title="whisper_scratch", lifespan=lifespan)
    app.state.batcher = batcher  # tests hold and spy on the worker through it

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return error_response(e.status, e.message, e.param, e.code, e.type)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # 404, 405: OpenAI's shape too
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):  # a bug: uvicorn logs the traceback, the client gets one line
        return error_response(500, f"internal error ({type(e).__name__}); see the server log", type="server_error")

    def authorize(request: Request) -> None:
        if opts.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {opts.api_key}".encode()):
            raise ApiError(401, "missing or incorrect API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": opts.model_name, "queued": batcher.queue.qsize(), "decoded": batcher.decoded}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        created = int(Path(opts.model_path).stat().st_mtime)
        return {"object": "list", "data": [{"id": opts.model_name, "object": "model", "created": created,
                                            "owned_by": "whisper_scratch"}]}

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        authorize(request)  # before reading the body
        try:
            batcher.arriving += 1  # the worker may wait for it
            try:
                form = await read_form(request, opts.max_upload_mb)
                try:
                    asked = parse_fields(form, opts.decoding, tokenizer, bool(model.dims.ctc))
                    upload = form.get("file")
                    if not isinstance(upload, UploadFile):
                        raise ApiError(400, "no audio: send the file in the multipart field 'file'", "file")
                    audio = await asyncio.to_thread(load_upload, upload)
                finally:
                    await form.close()
            finally:
                batcher.arriving -= 1
            chunks = max(1, math.ceil(len(audio) / SAMPLE_RATE / chunk_s))
            result = await wait_for(batcher.submit(audio, (asked.options, asked.words), chunks), request)
        except ClientDisconnect:  # nobody to answer; the other requests go on
            log.info("client disconnected before its transcription was sent")
            return Response(status_code=499)
        return render(result, asked)

    return app


def main(argv=None) -> int:
    opts = parse_options(ServerOptions, argv, prog="whisper-scratch-server")
    one_line_audio_warnings("whisper-scratch-server")
    try:
        app = create_app(opts)
    except (ValueError, FileNotFoundError) as e:
        print(f"whisper-scratch-server: error: {e}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=opts.host, port=opts.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
