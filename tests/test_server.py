"""The OpenAI-compatible server, driven by the real `openai` client against uvicorn in a thread.

The models are random-init and tiny (the protocol does not need a trained one; their output still
depends on the audio and the options). Every answer is compared with what the library's
`transcribe` gives for the same file and options, so a server that mixed up requests, options
or batches fails. Waits that depend on the worker use `wait_until`, never timing assertions.
"""
import re
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
import torch
import uvicorn

from whisper_scratch.audio import SAMPLE_RATE, load_audio
from whisper_scratch.checkpoint import load_model, save_checkpoint
from whisper_scratch.decoding import DecodingOptions
from whisper_scratch.longform import transcribe
from whisper_scratch.model import ModelDimensions, Whisper
from whisper_scratch.server import ServerOptions, create_app, main
from whisper_scratch.tokenizer import CharTokenizer
from whisper_scratch.vad import VadOptions
from whisper_scratch.writers import to_srt, to_txt, to_vtt
from conftest import DATA

TOK = CharTokenizer("abcdefgh", languages=("en", "mn"))
CHUNK_S = 4.0  # the checkpoint's longest_clip_seconds: the server must cut at it, as transcribe.py
DECODING = DecodingOptions(best_of=5, max_new_tokens=8)  # random models rarely emit <|endoftext|>
KEY = "sk-test"


def tiny_checkpoint(path: Path, ctc: bool) -> Path:
    torch.manual_seed(0)
    model = Whisper(ModelDimensions(80, 1500, 32, 4, 2, TOK.vocab_size, 48, 32, 4, 2, ctc=ctc))
    with torch.no_grad():  # sharper than the init: nearly uniform logits would sample the same text
        for p in model.parameters():  # whatever the prompt or language, and the option tests could not fail
            if p.dim() > 1:
                p.mul_(10)
    save_checkpoint(path, model, TOK, longest_clip_seconds=CHUNK_S)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict:
    """Digits at 8 kHz (wav), Common Voice mp3, an 11 s mp3 that VAD cuts into several chunks,
    a file of silence, and files that are not audio."""
    d = tmp_path_factory.mktemp("clips")
    files = {f"digit{i}": DATA / f"fsdd/recordings/{i}_george_{i}.wav" for i in range(6)}
    files["cv"] = sorted((DATA / "cv_sample/en/clips").glob("*.mp3"))[0]
    files["long"] = DATA / "samples/jfk/jfk.mp3"
    sf.write(d / "silence.wav", np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)
    files["silence"] = d / "silence.wav"
    (d / "empty.wav").write_bytes(b"")
    (d / "notes.wav").write_bytes(b"RIFF but not really a wav file")
    sf.write(d / "big.wav", np.random.default_rng(0).uniform(-0.5, 0.5, 8 * SAMPLE_RATE).astype(np.float32),
             SAMPLE_RATE)  # 256 kB of 16-bit PCM: far over the strict server's 0.05 MiB
    return {**files, "empty": d / "empty.wav", "notes": d / "notes.wav", "big": d / "big.wav"}


@contextmanager
def serving(opts: ServerOptions):
    """create_app served by uvicorn in a thread on a free port; yields (base url, app)."""
    app = create_app(opts)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "ctc.pt", ctc=True)


@pytest.fixture(scope="module")
def server(ckpt):
    """The server with continuous batching (--continuous true); `static` below has the default batches."""
    with serving(ServerOptions(model_path=str(ckpt), decoding=DECODING, batch_size=4, max_wait_ms=20,
                               continuous=True)) as s:
        yield s


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    """An API key, a 0.05 MiB upload limit and no CTC head."""
    path = tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "plain.pt", ctc=False)
    with serving(ServerOptions(model_path=str(path), decoding=DECODING, api_key=KEY, max_upload_mb=0.05)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="anything", max_retries=0)


@pytest.fixture(scope="module")
def library(ckpt):
    """transcribe(file, **options) as the library gives it, with the server's defaults."""
    model, tokenizer, _ = load_model(ckpt)
    vad = VadOptions(chunk_seconds=CHUNK_S)

    def run(path, options=DECODING, words=False):
        return transcribe(model, path, tokenizer, options, word_timestamps=words, vad=vad, batch_size=4)
    return run


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def ask(client, path, **kw):
    with open(path, "rb") as f:
        return client.audio.transcriptions.create(model="whisper-1", file=f, **kw)


@contextmanager
def worker_held(app):
    """The decoding worker blocks before it takes up its next requests until released; yields
    (entered, release)."""
    batcher, entered, release = app.state.batcher, threading.Event(), threading.Event()
    real = batcher.begin

    def held(key, group):
        entered.set()
        assert release.wait(60)
        return real(key, group)
    batcher.begin = held
    try:
        yield entered, release
    finally:
        release.set()
        batcher.begin = real


@contextmanager
def decoded_batches(app):
    """Records the list of audio lengths of every group of requests the worker takes up
    (decodes as a batch, or lets join its continuous batch)."""
    batcher, seen = app.state.batcher, []
    real = batcher.begin

    def spy(key, group):
        seen.append([len(j.audio) for j in group])
        return real(key, group)
    batcher.begin = spy
    try:
        yield seen
    finally:
        batcher.begin = real


@contextmanager
def rows_in_flight(monkeypatch):
    """Records how many chunks every continuous-batching step decodes."""
    from whisper_scratch.decoding import GreedyStream
    seen, real = [], GreedyStream.step

    def spy(self):
        seen.append(len(self))
        return real(self)
    monkeypatch.setattr(GreedyStream, "step", spy)
    yield seen


# -- answers -----------------------------------------------------------------------------------

def test_json_text_is_the_library_transcript(client, clips, library):
    texts = {}
    for name in ("digit0", "digit1", "cv", "long", "silence"):
        texts[name] = ask(client, clips[name]).text
        assert texts[name] == library(clips[name])["text"], name
    assert texts["silence"] == ""  # VAD finds no speech: nothing is decoded
    assert all(texts[n] for n in ("digit0", "cv", "long"))  # so the equality above is not "" == ""


def test_every_response_format(client, clips, library):
    ref = library(clips["long"])
    assert len(ref["segments"]) > 1  # 11 s cut into chunks of at most 4 s
    assert ask(client, clips["long"], response_format="text") == to_txt(ref)
    assert ask(client, clips["long"], response_format="srt") == to_srt(ref)
    assert ask(client, clips["long"], response_format="vtt") == to_vtt(ref)
    verbose = ask(client, clips["long"], response_format="verbose_json")
    assert (verbose.text, verbose.language, verbose.duration) == (ref["text"], "en", ref["duration"])
    assert verbose.words is None
    got = [(s.id, s.start, s.end, s.text, s.tokens, s.temperature, s.no_speech_prob) for s in verbose.segments]
    assert got == [(s["id"], s["start"], s["end"], s["text"], s["tokens"], s["temperature"], s["no_speech_prob"])
                   for s in ref["segments"]]
    assert all(0 <= s.no_speech_prob < 0.5 for s in verbose.segments)  # silero heard speech in every chunk


def test_word_timestamps(client, clips, library):
    ref = library(clips["long"], words=True)
    expected = [(w["word"], w["start"], w["end"]) for s in ref["segments"] for w in s["words"]]
    assert len(expected) > 1
    words_only = ask(client, clips["long"], response_format="verbose_json", timestamp_granularities=["word"])
    assert [(w.word, w.start, w.end) for w in words_only.words] == expected
    assert words_only.segments is None  # only what was asked for, as OpenAI
    both = ask(client, clips["long"], response_format="verbose_json", timestamp_granularities=["word", "segment"])
    assert [(w.word, w.start, w.end) for w in both.words] == expected
    assert [s.text for s in both.segments] == [s["text"] for s in ref["segments"]]


def test_per_request_options_override_the_defaults(client, clips, library):
    """temperature, prompt and language each change the decoding; asked together, each request
    must still get the answer for its own options (they cannot share a batch)."""
    cases = [({}, DECODING), ({"temperature": 0.6}, DECODING.at_temperature(0.6)),
             ({"prompt": "bad cafe"}, replace(DECODING, prompt=tuple(TOK.encode("bad cafe")))),
             ({"language": "mn"}, replace(DECODING, language="mn"))]
    expected = [library(clips["cv"], options)["text"] for _, options in cases]
    assert len(set(expected)) > 1  # the options matter to this model
    results = [None] * len(cases)

    def one(i):
        results[i] = ask(client, clips["cv"], **cases[i][0]).text
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cases))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results == expected
    assert ask(client, clips["cv"], response_format="verbose_json", language="mn").language == "mn"


@pytest.fixture(scope="module")
def static(ckpt):
    """The server with batches that start and end together (the default, --continuous false)."""
    with serving(ServerOptions(model_path=str(ckpt), decoding=DECODING, batch_size=4, max_wait_ms=20)) as s:
        yield s


def arrive_together(server, names: list, clips: dict) -> dict:
    """The first request is taken up alone; the others queue meanwhile, then go on together."""
    results = {}

    def one(name):
        results[name] = ask(openai.OpenAI(base_url=server[0] + "/v1", api_key="x", max_retries=0), clips[name]).text
    with worker_held(server[1]) as (entered, release):
        first = threading.Thread(target=one, args=(names[0],))
        first.start()
        assert entered.wait(30)  # the worker is busy with the first request ...
        rest = [threading.Thread(target=one, args=(n,)) for n in names[1:]]
        [t.start() for t in rest]
        wait_until(lambda: server[1].state.batcher.queue.qsize() == len(rest))  # ... while the others queue
        release.set()
        [t.join() for t in [first, *rest]]
    return results


@pytest.mark.parametrize("continuous", [True, False])
def test_all_torch_work_runs_in_the_worker_thread(server, static, clips, monkeypatch, continuous):
    """Silero, the encoder and the decoder run in the one worker thread: torch's OpenMP stops
    spin-waiting once more threads than cores have thread teams, and silero run on the uploads
    beside the worker made every decoder step about 3x slower."""
    import whisper_scratch.vad as vad
    from whisper_scratch.model import AudioEncoder, TextDecoder
    base, _ = server if continuous else static
    seen = set()

    def spy(real):
        return lambda *a, **k: seen.add(threading.current_thread().name) or real(*a, **k)
    monkeypatch.setattr(vad, "_silero_batch", spy(vad._silero_batch))
    monkeypatch.setattr(AudioEncoder, "forward", spy(AudioEncoder.forward))
    monkeypatch.setattr(TextDecoder, "forward", spy(TextDecoder.forward))
    ask(openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0), clips["cv"])
    assert seen == {"whisper-decoder"}, seen


def test_requests_that_arrive_together_are_decoded_together(server, client, clips, monkeypatch):
    """Continuous batching: the five queued requests join the first one's batch at once, and
    the batch never holds more than --batch_size 4 chunks."""
    names = [f"digit{i}" for i in range(6)]  # each shorter than a chunk: one chunk each
    sequential = {n: ask(client, clips[n]).text for n in names}
    with decoded_batches(server[1]) as batches, rows_in_flight(monkeypatch) as rows:
        results = arrive_together(server, names, clips)
    assert results == sequential  # all answered, each with its own transcript
    assert [len(b) for b in batches] == [1, 5]
    assert max(rows) == 4 and rows[0] == 1, rows  # the first alone, then full batches of 4 rows


def test_static_batches_take_requests_batch_size_chunks_at_a_time(static, clips, library):
    names = [f"digit{i}" for i in range(6)]
    with decoded_batches(static[1]) as batches:
        results = arrive_together(static, names, clips)
    assert results == {n: library(clips[n])["text"] for n in names}
    assert [len(b) for b in batches] == [1, 4, 1]  # the queue goes in batches of --batch_size 4 chunks


# -- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, file, status, message", [
    ({"response_format": "xml"}, "digit0", 400, "response_format must be one of json, text"),
    ({"language": "fr"}, "digit0", 400, "language 'fr' is not one of the model's languages"),
    ({"temperature": 2}, "digit0", 400, "temperature must be a number from 0 to 1"),
    ({"timestamp_granularities": ["word"]}, "digit0", 400, "needs response_format=verbose_json"),
    ({}, "empty", 400, "empty.wav: file is empty (0 bytes)"),
    ({}, "notes", 400, "notes.wav: not a readable audio file"),
])
def test_bad_requests_are_400_with_the_reason(client, clips, kw, file, status, message):
    with pytest.raises(openai.BadRequestError, match=re.escape(message)) as e:
        ask(client, clips[file], **kw)
    assert e.value.status_code == status and e.value.type == "invalid_request_error"
    assert "Traceback" not in e.value.response.text


def test_error_bodies_have_openais_shape(server):
    r = httpx.get(server[0] + "/v1/nothing-here")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(server[0] + "/v1/audio/transcriptions", data={"model": "whisper-1"})
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]
    r = httpx.post(server[0] + "/v1/audio/transcriptions", files={"model": (None, "whisper-1")})
    assert r.status_code == 400 and r.json()["error"] == {
        "message": "no audio: send the file in the multipart field 'file'", "type": "invalid_request_error",
        "param": "file", "code": None}


def test_api_key_upload_limit_and_missing_ctc_head(strict, clips):
    url = strict[0] + "/v1"
    with pytest.raises(openai.AuthenticationError, match="incorrect API key") as e:
        ask(openai.OpenAI(base_url=url, api_key="wrong", max_retries=0), clips["digit0"])
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    r = httpx.get(url + "/models")  # no Authorization header at all
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    good = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
    assert [m.id for m in good.models.list()] == ["whisper-scratch"]
    assert ask(good, clips["digit0"]).text is not None
    with pytest.raises(openai.APIStatusError, match="larger than this server's limit of 0.05 MiB") as e:
        ask(good, clips["big"])
    assert e.value.status_code == 413
    with pytest.raises(openai.BadRequestError, match="CTC head"):
        ask(good, clips["digit0"], response_format="verbose_json", timestamp_granularities=["word"])


def test_an_upload_without_content_length_is_cut_off_at_the_limit(strict, clips):
    """A chunked body says nothing of its size: the count while reading stops it."""
    data = Path(clips["big"]).read_bytes()
    boundary = "x" * 16
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.wav\"\r\n\r\n").encode()
    sent = []

    def chunks():
        for part in [body] + [data[i:i + 4096] for i in range(0, len(data), 4096)] * 10:
            sent.append(len(part))
            yield part
    r = httpx.post(strict[0] + "/v1/audio/transcriptions", content=chunks(),
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
    assert "content-length" not in {k.lower() for k in r.request.headers}


def test_a_declared_size_over_the_limit_is_refused_before_the_body(strict):
    """413 on the Content-Length header alone: the server answers without waiting for a body
    that never comes (a server that read first would hang here until the socket timeout)."""
    url = httpx.URL(strict[0])
    with socket.create_connection((url.host, url.port), timeout=30) as sock:
        sock.sendall(f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000000\r\n\r\n".encode())
        assert sock.recv(1 << 16).startswith(b"HTTP/1.1 413")


# -- robustness --------------------------------------------------------------------------------

def raw_request(base: str, path: Path, cut: int = 0) -> socket.socket:
    """A socket that has sent a transcription request for `path`, less its last `cut` bytes."""
    boundary = "b" * 20
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path.name}\"\r\n\r\n"
            ).encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode()
    url = httpx.URL(base)
    sock = socket.create_connection((url.host, url.port))
    sock.sendall(head + body[:len(body) - cut])
    return sock


def test_clients_that_hang_up_do_not_disturb_the_others(server, client, clips, library):
    """One client hangs up while its request is decoded, one mid-upload, one while queued; the
    request queued among them is answered, the queued one that hung up is never decoded."""
    base, app = server
    batcher = app.state.batcher
    expected = library(clips["digit3"])["text"]
    with raw_request(base, Path(clips["digit0"])) as sock:  # the raw request is well formed
        assert sock.recv(1 << 16).startswith(b"HTTP/1.1 200")
    answers = []
    with decoded_batches(app) as batches:
        with worker_held(app) as (entered, release):
            decoding = raw_request(base, Path(clips["digit1"]))
            assert entered.wait(30)
            waiting = threading.Thread(target=lambda: answers.append(ask(client, clips["digit3"]).text))
            waiting.start()
            wait_until(lambda: batcher.queue.qsize() == 1)
            raw_request(base, Path(clips["digit2"]), cut=500).close()  # mid-upload
            gone = raw_request(base, Path(clips["cv"]))
            wait_until(lambda: batcher.queue.qsize() == 2)
            gone.close()  # while queued
            wait_until(lambda: [job.abandoned for job in list(batcher.queue.queue)] == [False, True])
            decoding.close()  # mid-decode
            assert httpx.get(base + "/health").json()["queued"] == 2  # the event loop still answers
            release.set()
            waiting.join()
        assert answers == [expected]
        # a later request is decoded after (or with) the abandoned one: by its answer, the worker has passed it
        assert ask(client, clips["digit3"]).text == expected
    decoded = [n for b in batches for n in b]
    assert len(load_audio(clips["digit1"])) in decoded and len(load_audio(clips["cv"])) not in decoded
    assert batcher.thread.is_alive()


def broken(*args):
    raise RuntimeError("out of memory (pretend)")


@pytest.mark.parametrize("continuous", [True, False])
def test_a_batch_that_fails_fails_its_own_requests_only(server, static, clips, library, monkeypatch, continuous):
    """An error inside the decoder (here injected: in a continuous-batching step, or in a static
    batch) is a 500 in OpenAI's shape with one line, not a traceback, and the worker goes on with
    the next requests."""
    from whisper_scratch.decoding import GreedyStream
    base, app = server if continuous else static
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    with monkeypatch.context() as m:
        if continuous:
            m.setattr(GreedyStream, "step", broken)
        else:
            m.setattr(app.state.batcher, "decode", broken)
        with pytest.raises(openai.InternalServerError, match=re.escape("decoding failed: RuntimeError: out of memory (pretend)")) as e:
            ask(client, clips["digit0"])
    assert e.value.type == "server_error" and "Traceback" not in e.value.response.text
    assert ask(client, clips["digit0"]).text == library(clips["digit0"])["text"]


def test_models_and_health(client, server):
    assert [(m.id, m.object) for m in client.models.list()] == [("whisper-scratch", "model")]
    health = httpx.get(server[0] + "/health").json()
    assert (health["status"], health["model"], health["queued"]) == ("ok", "whisper-scratch", 0)
    assert 0 < health["decoded"]["batches"] <= health["decoded"]["requests"]


def test_command_line_errors(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model_path", str(tmp_path / "missing.pt")])
    assert e.value.code == 2 and "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model_path", str(ckpt), "--vad", "false"])
    assert "voice-activity chunks" in capsys.readouterr().err
    assert main(["--model_path", str(ckpt), "--language", "fr"]) == 2
    assert "not one of the model's languages" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model_path", str(tmp_path)])
    assert "a folder, not a checkpoint file" in capsys.readouterr().err
    assert main(["--model_path", str(ckpt), "--device", "foo"]) == 2
    assert "--device foo: not a device name" in capsys.readouterr().err


def test_a_lone_request_is_not_held_back_but_a_busy_server_fills_its_batch():
    """The worker waits up to max_wait for company only while busy (the last batch was shared or
    requests are uploading). max_wait here is 60 s: a wait would show as a collect that has not
    returned after 10 s."""
    from types import SimpleNamespace
    from whisper_scratch.server import Batcher
    batcher = Batcher(lambda key, audios: [], batch_size=4, max_wait_s=60.0)

    def collect():
        out = []
        t = threading.Thread(target=lambda: out.append(batcher._collect()), daemon=True)
        t.start()
        return t, out
    job = lambda: SimpleNamespace(chunks=1)  # noqa: E731
    first = job()
    batcher.last_batch = 1
    batcher.queue.put(first)
    t, out = collect()
    t.join(10)
    assert not t.is_alive() and out == [[first]]  # idle: decoded at once
    batcher.last_batch = 2  # busy: the batch waits for the next ones, until it is full
    jobs = [job() for _ in range(4)]
    batcher.queue.put(jobs[0])
    t, out = collect()
    for j in jobs[1:]:
        time.sleep(0.05)
        assert t.is_alive()  # still waiting for company
        batcher.queue.put(j)
    t.join(10)
    assert not t.is_alive() and out == [jobs]


def test_each_request_of_a_batch_is_answered_as_soon_as_it_is_done():
    """A batch's chunks that pass the fallback thresholds are answered before the few that decode
    again: the decoder yields request 1 first and then blocks; request 1's future must already
    be settled, request 0's not. A decoder that skips a request fails it with a message."""
    import asyncio
    from whisper_scratch.server import Batcher
    release = threading.Event()

    def decode(key, audios):
        yield 1, {"text": "early"}
        assert release.wait(10)
        yield 0, {"text": "late"}

    async def run():
        batcher = Batcher(decode, batch_size=4, max_wait_s=0.0)
        batcher.thread.start()
        jobs = [batcher.submit(None, ("k",), 1) for _ in range(2)]
        assert await asyncio.wait_for(jobs[1].future, 10) == {"text": "early"}
        assert not jobs[0].future.done()
        release.set()
        assert await asyncio.wait_for(jobs[0].future, 10) == {"text": "late"}
        batcher.decode = lambda key, audios: iter([(0, {"text": "only"})])
        jobs = [batcher.submit(None, ("k",), 1) for _ in range(2)]
        assert await asyncio.wait_for(jobs[0].future, 10) == {"text": "only"}
        with pytest.raises(RuntimeError, match="no result for 1 of 2"):
            await asyncio.wait_for(jobs[1].future, 10)
        await asyncio.to_thread(batcher.close)

    asyncio.run(run())


def test_a_truncated_upload_is_decoded_and_logged_under_its_own_name(tmp_path, caplog):
    import io
    import logging

    from starlette.datastructures import UploadFile

    from whisper_scratch.server import load_upload
    sf.write(tmp_path / "whole.wav", np.zeros(16000, dtype=np.float32), 16000, subtype="PCM_16")
    cut = (tmp_path / "whole.wav").read_bytes()[: 44 + 8000]
    with caplog.at_level(logging.WARNING, logger="whisper_scratch.server"):
        audio = load_upload(UploadFile(io.BytesIO(cut), filename="meeting.wav"))
    assert len(audio) == 4000
    assert [r.getMessage() for r in caplog.records] == [
        "meeting.wav: truncated: the header promises 1.00 s of audio, the file holds 0.25 s"]
    # uploads load in threads: each is logged once under its own name, and the process's warnings still work
    import warnings
    from concurrent.futures import ThreadPoolExecutor
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="whisper_scratch.server"), ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: load_upload(UploadFile(io.BytesIO(cut), filename=f"f{i}.wav")), range(40)))
    assert sorted(r.getMessage().split(":")[0] for r in caplog.records) == sorted(f"f{i}.wav" for i in range(40))
    with pytest.warns(UserWarning, match="still heard"):
        warnings.warn("still heard")
