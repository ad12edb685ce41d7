"""Long-form transcription, output formats and transcribe.py's four modes.

The long-form test needs a model whose output depends on the audio: a tiny model (2 s encoder
context, so 2 s long-form windows) is overfitted in a few seconds on three FSDD clips, "zero",
"one", "two", each placed at a random offset in a 2 s window, with and without a previous-text
prompt. A 70 s file of 35 such windows must then come out word for word, in order.
"""
import importlib.util
import json
import random
import re
import shutil
import sys
from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from whisper_scratch import decoding, longform
from whisper_scratch.audio import SAMPLE_RATE, load_audio, log_mel_spectrogram
from whisper_scratch.checkpoint import save_checkpoint
from whisper_scratch.decoding import DecodingOptions
from whisper_scratch.longform import transcribe
from whisper_scratch.writers import format_timestamp, to_srt, to_tsv, to_vtt, write_result
from whisper_scratch.model import ModelDimensions, Whisper
from whisper_scratch.tokenizer import CharTokenizer
from whisper_scratch.vad import VadOptions
from conftest import DATA, REPO

# transcribe.py is a script at the repository root, not part of the installed package
_spec = importlib.util.spec_from_file_location("transcribe_cli", REPO / "transcribe.py")
cli = sys.modules.setdefault("transcribe_cli", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(cli)

WORDS = ["zero", "one", "two"]
TOK = CharTokenizer("zerontw")
WINDOW = 2 * SAMPLE_RATE
FAST = ["--max_new_tokens", "8", "--no-progress"]


def in_window(clip: np.ndarray, rng, centred: bool = False) -> np.ndarray:
    """The clip at a random offset in a 2 s window (centred: within 0.15 s of the middle, so
    neighbouring windows' words are > 1 s apart and voice-activity chunks hold one word each)."""
    w = np.zeros(WINDOW, np.float32)
    middle, jitter = (WINDOW - len(clip)) // 2, int(0.15 * SAMPLE_RATE)
    off = middle + rng.integers(-jitter, jitter) if centred else rng.integers(0, WINDOW - len(clip))
    w[off:off + len(clip)] = clip
    return w


@pytest.fixture(scope="module")
def digit_clips():
    clips = [load_audio(DATA / f"fsdd/recordings/{d}_george_5.wav") for d in range(3)]
    return [0.5 * c / np.abs(c).max() for c in clips]  # same peak: similar log-mel floors


@pytest.fixture(scope="module")
def digit_model(digit_clips):
    """Overfit a tiny model (n_audio_ctx 100 = 2 s) on 3 clips: ~120 AdamW steps, a few seconds."""
    torch.manual_seed(0)
    rng, prng = np.random.default_rng(0), random.Random(0)
    model = Whisper(ModelDimensions(80, 100, 64, 4, 2, TOK.vocab_size, 40, 64, 4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sot = list(TOK.sot_sequence())
    for step in range(120):
        mels, seqs, starts = [], [], []
        for clip, word in zip(digit_clips, WORDS):
            for with_prompt in (False, True):  # long-form windows come with the text so far
                mels.append(log_mel_spectrogram(in_window(clip, rng)))
                prev = " ".join(prng.choice(WORDS) for _ in range(prng.randint(1, 4)))
                prompt = [TOK.startofprev] + TOK.encode(prev) if with_prompt else []
                seqs.append(prompt + sot + TOK.encode(word) + [TOK.eot])
                starts.append(len(prompt) + len(sot))
        L = max(map(len, seqs))
        tokens = torch.full((len(seqs), L), TOK.pad)
        targets = torch.full((len(seqs), L), TOK.pad)
        for i, (s, st) in enumerate(zip(seqs, starts)):
            tokens[i, :len(s)] = torch.tensor(s)
            targets[i, st - 1:len(s) - 1] = torch.tensor(s[st:])
        loss = F.cross_entropy(model(torch.stack(mels), None, tokens).flatten(0, 1), targets.flatten(),
                               ignore_index=TOK.pad)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, f"the tiny model did not fit its 3 clips (loss {loss.item():.3f})"
    return model.eval()


@pytest.fixture(scope="module")
def long_audio(digit_clips):
    """70 s: 35 digit clips, one per 2 s window near its middle, in a random order."""
    rng = np.random.default_rng(1)
    order = [int(d) for d in rng.integers(0, 3, 35)]
    return np.concatenate([in_window(digit_clips[d], rng, centred=True) for d in order]), [WORDS[d] for d in order]


def test_70s_file_is_transcribed_in_order_with_increasing_timestamps(digit_model, long_audio, monkeypatch):
    audio, words = long_audio
    assert len(audio) == 70 * SAMPLE_RATE
    prompts = []
    real = decoding.decode_with_fallback

    def spy(model, mel, mel_lens, tokenizer, options, fallback):
        prompts.append(TOK.decode(options.prompt))
        return real(model, mel, mel_lens, tokenizer, options, fallback)

    monkeypatch.setattr(longform, "decode_with_fallback", spy)
    result = transcribe(digit_model, audio, TOK, DecodingOptions(max_new_tokens=8))
    assert result["text"] == " ".join(words)
    segs = result["segments"]
    assert [s["text"] for s in segs] == words
    assert [(s["start"], s["end"]) for s in segs] == [(2.0 * i, 2.0 * i + 2) for i in range(35)]
    assert result["duration"] == 70.0
    # each window was prompted with the end of the text before it (<|startofprev|> ...)
    assert prompts[0] == ""
    for k in range(1, 35):
        assert prompts[k] and " ".join(words[:k]).endswith(prompts[k])
    unprompted = transcribe(digit_model, audio, TOK, DecodingOptions(max_new_tokens=8),
                            condition_on_previous_text=False)
    assert unprompted["text"] == result["text"]


def test_30s_windows_and_a_shorter_tail():
    """A model with the full 30 s context: 65 s -> windows [0, 30), [30, 60), [60, 65]."""
    torch.manual_seed(0)
    model = Whisper(ModelDimensions(80, 1500, 32, 4, 1, TOK.vocab_size, 16, 32, 4, 1)).eval()
    speech = load_audio(DATA / "samples/jfk/jfk.wav")
    audio = np.concatenate([speech] * 6)[: 65 * SAMPLE_RATE]
    calls = []
    real = decoding.decode_with_fallback

    def spy(model, mel, mel_lens, tokenizer, options, fallback):
        calls.append((mel.shape[-1], int(mel_lens[0])))
        return real(model, mel, mel_lens, tokenizer, options, fallback)

    longform.decode_with_fallback = spy
    try:
        result = transcribe(model, audio, TOK, DecodingOptions(max_new_tokens=4), decoding.NO_FALLBACK)
    finally:
        longform.decode_with_fallback = real
    assert calls == [(3000, 3000), (3000, 3000), (500, 500)]  # the tail at its own length
    assert [(s["start"], s["end"]) for s in result["segments"]] == [(0.0, 30.0), (30.0, 60.0), (60.0, 65.0)]
    # a window of digital silence is not decoded and gives no segment (the model would read a word into it);
    # a quiet one (noise at -70 dBFS) still is
    audio[30 * SAMPLE_RATE: 60 * SAMPLE_RATE] = 0.0
    audio[60 * SAMPLE_RATE:] = 3e-4 * np.random.default_rng(0).standard_normal(5 * SAMPLE_RATE)
    calls.clear()
    longform.decode_with_fallback = spy
    try:
        result = transcribe(model, audio, TOK, DecodingOptions(max_new_tokens=4), decoding.NO_FALLBACK)
    finally:
        longform.decode_with_fallback = real
    assert calls == [(3000, 3000), (500, 500)]
    assert [(s["id"], s["start"], s["end"]) for s in result["segments"]] == [(0, 0.0, 30.0), (1, 60.0, 65.0)]


# -- voice-activity chunks --------------------------------------------------------------------

def spaced_digits(digit_clips, order, rng, silence_after: int = -1, silence_s: float = 8.0):
    """Digits one per 2 s window near its middle, and silence_s of digital silence after word
    `silence_after`: (audio, [(first, end) sample of each word])."""
    parts, spans, t = [], [], 0
    for k, d in enumerate(order):
        w = in_window(digit_clips[d], rng, centred=True)
        nz = np.flatnonzero(w)
        spans.append((t + nz[0], t + nz[-1] + 1))
        parts.append(w)
        t += len(w)
        if k == silence_after:
            parts.append(np.zeros(int(silence_s * SAMPLE_RATE), np.float32))
            t += int(silence_s * SAMPLE_RATE)
    return np.concatenate(parts), spans


def test_vad_chunks_are_decoded_in_batches_with_their_real_times(digit_model, digit_clips, monkeypatch):
    """20 digits and 8 s of silence: one chunk per word (chunk limit 2 s, words > 1 s apart),
    decoded 8 at a time, longest first; every word in order, each segment holding its word's
    samples, none in the silence."""
    rng = np.random.default_rng(5)
    order = [int(d) for d in rng.integers(0, 3, 20)]
    audio, spans = spaced_digits(digit_clips, order, rng, silence_after=9)
    batches = []
    real = decoding.encode

    def spy(model, mel, mel_lens):
        batches.append(mel_lens.tolist())
        return real(model, mel, mel_lens)

    monkeypatch.setattr(decoding, "encode", spy)
    vad = VadOptions(chunk_seconds=2.0)
    result = transcribe(digit_model, audio, TOK, DecodingOptions(max_new_tokens=8), decoding.NO_FALLBACK, vad=vad,
                        batch_size=8)
    segs = result["segments"]
    assert [s["text"] for s in segs] == [WORDS[d] for d in order]
    assert [len(b) for b in batches] == [8, 8, 4]
    lens = [n for b in batches for n in b]
    assert lens == sorted(lens, reverse=True)
    assert [s["id"] for s in segs] == list(range(20))
    assert all(0 <= s["no_speech_prob"] < 0.5 for s in segs)  # silero's word: each chunk holds speech
    silence = (spans[9][1] / SAMPLE_RATE, spans[10][0] / SAMPLE_RATE)
    for s, (a, b) in zip(segs, spans):
        # the clip's first and last non-zero samples (FSDD clips start and end with quiet noise)
        assert s["start"] <= a / SAMPLE_RATE + 0.1 and b / SAMPLE_RATE - 0.1 <= s["end"] <= s["start"] + 2.0, (s, a, b)
        assert s["end"] <= silence[0] + 0.5 or s["start"] >= silence[1] - 0.5
    assert result["duration"] == len(audio) / SAMPLE_RATE
    silent = transcribe(digit_model, np.zeros(10 * SAMPLE_RATE, np.float32), TOK, DecodingOptions(max_new_tokens=8),
                        vad=vad)
    assert silent["text"] == "" and silent["segments"] == []


def test_vad_batches_mix_long_and_short_files_and_equal_one_by_one(digit_model, digit_clips, tmp_path, monkeypatch):
    rng = np.random.default_rng(6)
    long_audio, _ = spaced_digits(digit_clips, [0, 1, 2, 2, 1], rng)
    paths = [tmp_path / "long.wav", tmp_path / "broken.wav"] + [tmp_path / f"{w}.flac" for w in WORDS]
    sf.write(paths[0], long_audio, SAMPLE_RATE)
    paths[1].write_bytes(b"RIFF no")
    for p, clip in zip(paths[2:], digit_clips):
        sf.write(p, in_window(clip, rng), SAMPLE_RATE)
    options, vad = DecodingOptions(max_new_tokens=8), VadOptions(chunk_seconds=2.0)
    batches = []
    real = decoding.encode
    monkeypatch.setattr(decoding, "encode", lambda m, mel, lens: batches.append(len(lens)) or real(m, mel, lens))
    batched = dict(longform.transcribe_files(digit_model, paths, TOK, options, decoding.NO_FALLBACK, batch_size=4,
                                             vad=vad))
    assert batches == [4, 4]  # 5 chunks of the long file and 3 short files, in two batches
    assert isinstance(batched[str(paths[1])], Exception) and "broken.wav" in str(batched[str(paths[1])])
    assert batched[str(paths[0])]["text"] == "zero one two two one"
    assert list(batched) == [str(p) for p in paths]  # in input order
    # in_order=False (the server): each file as soon as it is done, the unreadable one at once
    early = list(longform.transcribe_chunks(digit_model, [(str(p), p) for p in paths], TOK, options,
                                            decoding.NO_FALLBACK, vad, 4, in_order=False))
    assert early[0][0] == str(paths[1]) and sorted(k for k, _ in early) == sorted(batched)
    assert all(r["text"] == batched[k]["text"] for k, r in early if not isinstance(r, Exception))
    for p in paths[2:] + paths[:1]:
        alone = transcribe(digit_model, p, TOK, options, decoding.NO_FALLBACK, vad=vad)
        assert batched[str(p)]["text"] == alone["text"]
        assert [(s["start"], s["end"]) for s in batched[str(p)]["segments"]] == [
            (s["start"], s["end"]) for s in alone["segments"]]


def test_continuous_batching_gives_each_file_what_transcribe_gives_it(digit_model, digit_clips, monkeypatch):
    """longform.ChunkStream (the server's continuous batching): files join while others decode,
    at most batch_size chunks decode at once, and each file's transcript (text, segments, times,
    scores) equals what transcribe gives that file alone. Silence gives an empty transcript."""
    rng = np.random.default_rng(7)
    files = {"long": spaced_digits(digit_clips, [2, 0, 1, 1, 0, 2], rng)[0],
             "silence": np.zeros(3 * SAMPLE_RATE, np.float32),
             **{w: in_window(c, rng) for w, c in zip(WORDS, digit_clips)}}
    options, vad = DecodingOptions(max_new_tokens=8), VadOptions(chunk_seconds=2.0)
    rows, real = [], decoding.GreedyStream.step
    monkeypatch.setattr(decoding.GreedyStream, "step", lambda self: rows.append(len(self)) or real(self))
    stream = longform.ChunkStream(digit_model, TOK, options, decoding.FallbackOptions(), vad, batch_size=4)
    arrivals = {0: ["long"], 2: ["zero", "silence"], 5: ["one", "two"]}  # step -> files submitted before it
    done, step = {}, 0
    while stream.busy or step <= max(arrivals):
        if step in arrivals:
            stream.submit([(k, files[k], False) for k in arrivals[step]])
        done.update(stream.step())
        step += 1
    assert max(rows) == 4, rows  # the long file's 6 chunks: 4 rows at a time, the rest wait
    assert sorted(done) == sorted(files)
    for key, audio in files.items():
        alone = transcribe(digit_model, audio, TOK, options, vad=vad)
        assert rounded(done[key]) == rounded(alone), key
    assert done["long"]["text"] == "two zero one one zero two" and done["silence"]["segments"] == []


SRT_CUE = re.compile(r"(\d+)\n(\d\d):(\d\d):(\d\d),(\d\d\d) --> (\d\d):(\d\d):(\d\d),(\d\d\d)\n(.+)\n")
VTT_CUE = re.compile(r"(\d\d):(\d\d):(\d\d)\.(\d\d\d) --> (\d\d):(\d\d):(\d\d)\.(\d\d\d)\n(.+)\n")


def seconds(h, m, s, ms) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def parse_srt(text: str) -> list:
    blocks = [b for b in text.split("\n\n") if b.strip()]
    cues = []
    for i, block in enumerate(blocks, start=1):
        m = SRT_CUE.fullmatch(block + "\n")
        assert m, f"not an SRT cue: {block!r}"
        assert int(m.group(1)) == i
        cues.append((seconds(*m.group(2, 3, 4, 5)), seconds(*m.group(6, 7, 8, 9)), m.group(10)))
    return cues


def parse_vtt(text: str) -> list:
    assert text.startswith("WEBVTT\n\n")
    blocks = [b for b in text[len("WEBVTT\n\n"):].split("\n\n") if b.strip()]
    cues = []
    for block in blocks:
        m = VTT_CUE.fullmatch(block + "\n")
        assert m, f"not a VTT cue: {block!r}"
        cues.append((seconds(*m.group(1, 2, 3, 4)), seconds(*m.group(5, 6, 7, 8)), m.group(9)))
    return cues


def test_every_input_gets_its_own_output_stem():
    stems = cli.output_stems(["a.wav", "a.flac", "b.wav", "/x/utt1.wav", "/y/utt1.wav", "evaluation.wav", "A.mp3",
                              "c.wav"], reserved=("evaluation",))
    assert {n: s.as_posix() for n, s in stems.items()} == {
        "a.wav": "a.wav", "a.flac": "a.flac", "b.wav": "b", "/x/utt1.wav": "utt1.wav", "/y/utt1.wav": "utt1.wav-2",
        "evaluation.wav": "evaluation.wav", "A.mp3": "A.mp3", "c.wav": "c"}


def test_srt_vtt_tsv_json_parse(tmp_path):
    segs = [{"start": 0.0, "end": 30.0, "text": "first window"}, {"start": 30.0, "end": 60.0, "text": ""},
            {"start": 60.0, "end": 3725.5, "text": "after an hour"}]
    result = {"text": "first window after an hour", "segments": segs, "language": "mn", "duration": 3725.5}
    want = [(0.0, 30.0, "first window"), (60.0, 3725.5, "after an hour")]  # empty segments are no cues
    assert parse_srt(to_srt(result)) == want
    assert parse_vtt(to_vtt(result)) == want
    assert to_tsv(result).splitlines() == ["start\tend\ttext", "0\t30000\tfirst window", "60000\t3725500\tafter an hour"]
    assert format_timestamp(3725.5, ",") == "01:02:05,500" and format_timestamp(61.0, always_include_hours=False) == "01:01.000"
    written = write_result(result, tmp_path / "sub" / "clip", ["all"])
    assert sorted(p.suffix for p in written) == [".json", ".srt", ".tsv", ".txt", ".vtt"]
    assert json.loads((tmp_path / "sub" / "clip.json").read_text()) == result
    with pytest.raises(ValueError, match="'doc'"):
        write_result(result, tmp_path / "x", ["doc"])
    # text that is markup in a cue: entities in WebVTT, and no "-->" inside an SRT cue
    odd = {**result, "segments": [{"start": 0.0, "end": 1.0, "text": "if x < 5 & y > 3 --> done",
                                   "words": [{"word": w, "start": 0.1 * i, "end": 0.1 * i + 0.1}
                                             for i, w in enumerate("if x < 5 & y > 3 --> done".split())]}]}
    assert to_vtt(odd).splitlines()[3] == "if x &lt; 5 &amp; y &gt; 3 --&gt; done"
    assert to_srt(odd).splitlines()[2] == "if x < 5 & y > 3 -> done"
    assert "-->" not in to_srt({**odd, "segments": [{"start": 0.0, "end": 1.0, "text": "a --->> b"}]}).splitlines()[2]
    assert "<u>&lt;</u>" in to_vtt(odd, highlight=True)  # the tag stays a tag, the text is escaped


def test_word_level_srt_and_vtt_cues():
    words = [{"word": w, "start": a, "end": b, "probability": 0.9}
             for w, a, b in (("сайн", 1.0, 1.4), ("байна", 1.5, 2.0), ("уу", 2.1, 2.3))]
    result = {"text": "сайн байна уу", "language": "mn", "duration": 3.0,
              "segments": [{"start": 0.8, "end": 2.6, "text": "сайн байна уу", "words": words},
                           {"start": 2.6, "end": 3.0, "text": "no words here"}]}
    assert parse_srt(to_srt(result, max_words=2)) == [(1.0, 2.0, "сайн байна"), (2.1, 2.3, "уу"),
                                                       (2.6, 3.0, "no words here")]
    assert parse_vtt(to_vtt(result, max_words=1))[:3] == [(1.0, 1.4, "сайн"), (1.5, 2.0, "байна"), (2.1, 2.3, "уу")]
    assert parse_vtt(to_vtt(result, highlight=True))[:2] == [(1.0, 1.4, "<u>сайн</u> байна уу"),
                                                              (1.5, 2.0, "сайн <u>байна</u> уу")]
    assert parse_srt(to_srt(result)) == [(0.8, 2.6, "сайн байна уу"), (2.6, 3.0, "no words here")]


# -- the command line --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(digit_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "best_model.pt"
    save_checkpoint(path, digit_model, TOK)
    return path


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory, digit_clips, long_audio):
    """wav/flac/mp3/ogg files in nested folders, a 70 s file, and two unreadable files."""
    d = tmp_path_factory.mktemp("audio")
    (d / "nested" / "deeper").mkdir(parents=True)
    rng = np.random.default_rng(2)
    for i, (clip, word) in enumerate(zip(digit_clips, WORDS)):
        sf.write(d / f"{word}.wav", in_window(clip, rng), SAMPLE_RATE)
    sf.write(d / "nested" / "two.flac", in_window(digit_clips[2], rng), SAMPLE_RATE)
    sf.write(d / "nested" / "deeper" / "one.ogg", in_window(digit_clips[1], rng), SAMPLE_RATE,
             format="OGG", subtype="VORBIS")
    shutil.copy(DATA / "samples/jfk/jfk.mp3", d / "nested" / "jfk.mp3")
    sf.write(d / "long.wav", long_audio[0], SAMPLE_RATE)
    (d / "nested" / "broken.wav").write_bytes(b"RIFF not really a wav file")
    (d / "empty.flac").write_bytes(b"")
    (d / "notes.txt").write_text("not audio")
    return d


def read_tsv(path: Path) -> dict:
    return dict(line.split("\t", 1) for line in path.read_text(encoding="utf-8").splitlines())


def test_directory_mode_reports_bad_files_and_goes_on(checkpoint, audio_dir, long_audio, tmp_path, capsys):
    out = tmp_path / "out.txt"
    rc = cli.main(["--model_path", str(checkpoint), "--mode", "directory", "--audio_dir", str(audio_dir),
                   "--output_file", str(out), *FAST])
    err = capsys.readouterr().err
    assert rc == 1 and "broken.wav" in err and "empty.flac" in err and "2 of 9 files failed" in err
    got = read_tsv(out)
    assert sorted(got) == ["long.wav", "nested/deeper/one.ogg", "nested/jfk.mp3", "nested/two.flac",
                           "one.wav", "two.wav", "zero.wav"]
    assert got["zero.wav"] == "zero" and got["nested/two.flac"] == "two" and got["nested/deeper/one.ogg"] == "one"
    assert got["long.wav"] == " ".join(long_audio[1])
    # one output stem per input: a.wav and a.flac side by side keep their extension; a symlinked file is
    # named as the link, and its files stay under --output_dir
    folder = tmp_path / "same"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(audio_dir / "zero.wav", folder / "a.wav")
    sf.write(folder / "a.flac", load_audio(audio_dir / "two.wav"), SAMPLE_RATE)
    shutil.copy(audio_dir / "one.wav", tmp_path / "outside.wav")
    (folder / "sub" / "link.wav").symlink_to(tmp_path / "outside.wav")
    for mode in ("directory", "batch"):
        out_dir = tmp_path / f"out_{mode}"
        assert cli.main(["--model_path", str(checkpoint), "--mode", mode, "--audio_dir", str(folder),
                         "--output_format", "txt", "--output_dir", str(out_dir), *FAST]) == 0
        assert sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*.txt")) == [
            "a.flac.txt", "a.wav.txt", "sub/link.txt"], mode
        assert (out_dir / "a.wav.txt").read_text().strip() == "zero" and (out_dir / "a.flac.txt").read_text().strip() == "two"
        assert dict(line.split("\t") for line in capsys.readouterr().out.strip().splitlines())["sub/link.wav"] == "one"
    assert not list((folder / "sub").glob("*.txt"))
    for mode in ("directory", "batch"):  # nowhere else to write: stdout, the same lines
        assert cli.main(["--model_path", str(checkpoint), "--mode", mode, "--audio_dir", str(audio_dir), *FAST]) == 1
        lines = dict(line.split("\t", 1) for line in capsys.readouterr().out.strip().splitlines())
        assert lines == got, mode


def rounded(obj):
    if isinstance(obj, float):
        return round(obj, 5)
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    return [rounded(v) for v in obj] if isinstance(obj, list) else obj


def test_batch_mode_equals_directory_mode(checkpoint, audio_dir, tmp_path):
    outs = {}
    for mode in ("directory", "batch"):
        outs[mode] = tmp_path / f"{mode}.txt"
        cli.main(["--model-path", str(checkpoint), "--mode", mode, "--audio-dir", str(audio_dir), "--batch-size", "3",
                  "--output-file", str(outs[mode]), "--output_format", "all", "--output_dir", str(tmp_path / mode),
                  *FAST])
    assert read_tsv(outs["batch"]) == read_tsv(outs["directory"])
    for name in ("zero.srt", "nested/jfk.vtt", "nested/deeper/one.tsv"):
        assert (tmp_path / "batch" / name).read_text() == (tmp_path / "directory" / name).read_text()
    # the same up to float rounding (a batch of chunks sums in another order): scores to 1e-5
    batch, alone = (rounded(json.loads((tmp_path / mode / "long.json").read_text())) for mode in ("batch", "directory"))
    assert batch == alone
    long_srt = parse_srt((tmp_path / "batch" / "long.srt").read_text())
    assert len(long_srt) == 35 and all(a[1] <= b[0] for a, b in zip(long_srt, long_srt[1:]))
    # without voice-activity chunks too: the same lines (batch writes each as its batch ends, longest
    # first), and digital silence gives no text in either mode
    folder = tmp_path / "mixed"
    shutil.copytree(audio_dir, folder)
    sf.write(folder / "quiet.wav", np.zeros(3 * SAMPLE_RATE, np.float32), SAMPLE_RATE)
    lines = {}
    for mode in ("directory", "batch"):
        out = tmp_path / f"{mode}_novad.txt"
        cli.main(["--model_path", str(checkpoint), "--mode", mode, "--audio_dir", str(folder), "--batch_size", "3",
                  "--vad", "false", "--output_file", str(out), *FAST])
        lines[mode] = sorted(out.read_text().splitlines())
    assert lines["batch"] == lines["directory"] and "quiet.wav\t" in lines["batch"]


def test_vad_false_keeps_the_window_path(checkpoint, audio_dir, long_audio, tmp_path):
    segments = {}
    for vad in ("true", "false"):
        out = tmp_path / vad
        assert cli.main(["--model_path", str(checkpoint), "--audio_path", str(audio_dir / "long.wav"), "--vad", vad,
                         "--output_format", "json", "--output_dir", str(out), *FAST]) == 0
        result = json.loads((out / "long.json").read_text())
        assert result["text"] == " ".join(long_audio[1])
        segments[vad] = [(s["start"], s["end"]) for s in result["segments"]]
    assert segments["false"] == [(2.0 * i, 2.0 * i + 2) for i in range(35)]  # fixed windows
    # speech chunks: each inside its word's 2 s window, shorter than it
    assert all(2 * i <= a < b <= 2 * i + 2 and b - a < 1.9 for i, (a, b) in enumerate(segments["true"]))


def test_single_mode(checkpoint, audio_dir, tmp_path, capsys):
    rc = cli.main(["--model_path", str(checkpoint), "--mode", "single", "--audio_path", str(audio_dir / "two.wav"),
                   "--output_format", "srt", "--output_dir", str(tmp_path), "--beam_size", "3", *FAST])
    assert rc == 0 and capsys.readouterr().out.strip() == "two"
    assert parse_srt((tmp_path / "two.srt").read_text()) == [(0.0, 2.0, "two")]
    assert cli.main(["--model_path", str(checkpoint), "--audio_path", str(audio_dir / "two.wav"),
                     "--dtype", "bfloat16", "--device", "cpu", *FAST]) == 0
    assert capsys.readouterr().out.strip()  # some text under bf16 autocast


def test_a_truncated_file_is_transcribed_and_named_in_a_one_line_warning(checkpoint, audio_dir, tmp_path, capsys):
    import warnings
    data = (audio_dir / "two.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])
    with warnings.catch_warnings():  # main() installs its one-line printer; leave the test session's as it was
        rc = cli.main(["--model_path", str(checkpoint), "--audio_path", str(tmp_path / "cut.wav"), *FAST])
    err = capsys.readouterr().err
    assert rc == 0 and f"transcribe.py: warning: {tmp_path / 'cut.wav'}: truncated: the header promises" in err, err
    assert "AudioWarning" not in err and "load_audio(" not in err


def test_int8_quantized_decoding_gives_the_same_words(checkpoint, audio_dir, capsys):
    base = ["--model_path", str(checkpoint), "--audio_path", str(audio_dir / "two.wav"), "--device", "cpu", *FAST]
    assert cli.main(base) == 0
    fp32 = capsys.readouterr().out.strip()
    assert cli.main(base + ["--quantize", "int8"]) == 0
    assert capsys.readouterr().out.strip() == fp32 == "two"
    assert cli.parse_options(cli.TranscribeOptions, base + ["--quantize", "none"]).quantize is None
    with pytest.raises(SystemExit):  # int8 weights with fp16 activations: refused with both values
        cli.parse_options(cli.TranscribeOptions, base + ["--quantize", "int8", "--dtype", "fp16"])
    assert "--quantize int8" in capsys.readouterr().err
    from whisper_scratch.checkpoint import load_model, quantize
    model = load_model(checkpoint)[0]
    with pytest.raises(ValueError, match="CPU only, got --device cuda"):
        quantize(model, "int8", "cuda")
    assert "quantized.dynamic" in type(quantize(model, "int8", "cpu").decoder.blocks[0].mlp[0]).__module__
    assert quantize(model, None, "cpu") is model


@pytest.mark.parametrize("search", [[], ["--beam_size", "3"]])
def test_bf16_weights_decode_the_same_words(checkpoint, audio_dir, capsys, search):
    """--quantize bf16: weights (LayerNorms excepted) and activations in bfloat16, greedy or beam
    search; the same words as fp32."""
    base = ["--model_path", str(checkpoint), "--audio_path", str(audio_dir / "two.wav"), "--device", "cpu", *FAST,
            *search]
    assert cli.main(base) == 0
    fp32 = capsys.readouterr().out.strip()
    assert cli.main(base + ["--quantize", "bf16"]) == 0
    assert capsys.readouterr().out.strip() == fp32 == "two"
    with pytest.raises(SystemExit):  # bf16 weights under fp16 autocast: refused with both values
        cli.parse_options(cli.TranscribeOptions, base + ["--quantize", "bf16", "--dtype", "fp16"])
    assert "--quantize bf16" in capsys.readouterr().err
    from whisper_scratch.checkpoint import load_model, quantize
    model = quantize(load_model(checkpoint)[0], "bf16", "cpu")
    assert model.decoder.blocks[0].mlp[0].weight.dtype == model.encoder.conv1.weight.dtype == torch.bfloat16
    assert model.decoder.blocks[0].mlp_ln.weight.dtype == model.encoder.ln_post.weight.dtype == torch.float32


def test_every_decoding_flag_reaches_the_decoder(checkpoint, audio_dir):
    base = ["--model_path", str(checkpoint), "--audio_path", str(audio_dir / "two.wav")]
    opts = cli.parse_options(cli.TranscribeOptions, base + [
        "--beam_size", "4", "--patience", "1.5", "--length-penalty", "0.6", "--max_new_tokens", "9",
        "--ctc_weight", "0.2", "--language", "mn", "--temperature_increment_on_fallback", "0.3",
        "--logprob_threshold", "none", "--dtype", "fp16"])
    d, f = opts.decoding, opts.fallback
    assert (d.beam_size, d.patience, d.length_penalty, d.max_new_tokens, d.ctc_weight, d.language, d.best_of) == (
        4, 1.5, 0.6, 9, 0.2, "mn", 5)
    assert f.temperatures(d.temperature) == (0.0, 0.3, 0.6, 0.9) and f.logprob_threshold is None
    assert f.compression_ratio_threshold == 2.4 and opts.dtype == "float16"  # fp16 and float16 are one value
    sampled = cli.parse_options(cli.TranscribeOptions, base + ["--temperature", "0.4", "--best_of", "3"]).decoding
    assert (sampled.temperature, sampled.best_of) == (0.4, 3)
    with pytest.raises(SystemExit):  # a combination that would be ignored is a usage error
        cli.parse_options(cli.TranscribeOptions, base + ["--temperature", "0.4", "--beam_size", "4"])


def test_evaluate_mode(checkpoint, audio_dir, tmp_path, capsys):
    refs = tmp_path / "refs" / "manifest.tsv"  # a manifest: paths relative to its own folder
    refs.parent.mkdir()
    rows = [("zero.wav", "Zero!"), ("one.wav", "one"), ("two.wav", "two two"), ("nested/two.flac", "TWO"),
            ("nested/deeper/one.ogg", "zero"), ("missing.wav", "one"), ("nested/broken.wav", "two")]
    refs.write_text("path\tduration\ttext\n" + "".join(f"{p}\t1.0\t{t}\n" for p, t in rows), encoding="utf-8")
    report_dir = tmp_path / "report"
    rc = cli.main(["--model_path", str(checkpoint), "--mode", "evaluate", "--audio_dir", str(audio_dir),
                   "--reference_file", str(refs), "--output_dir", str(report_dir), *FAST])
    printed = capsys.readouterr().out
    assert rc == 0 and "WER" in printed and "CER" in printed and "worst utterances" in printed
    summary = json.loads((report_dir / "evaluation.json").read_text())
    assert summary["reference_format"] == "manifest" and summary["n_scored"] == 5
    assert summary["missing_audio"] == ["missing.wav"] and summary["failed"] == ["nested/broken.wav"]
    assert sorted(summary["missing_reference"]) == ["empty.flac", "long.wav", "nested/jfk.mp3"]
    lines = (report_dir / "evaluation.tsv").read_text(encoding="utf-8").splitlines()
    header, table = lines[0].split("\t"), [dict(zip(lines[0].split("\t"), l.split("\t"))) for l in lines[1:]]
    assert len(table) == 5 and header[0] == "path"
    refs_norm, hyps = [r["reference"] for r in table], [r["hypothesis"] for r in table]
    assert refs_norm[0] == "zero"  # normalised with the tokenizer's rule
    assert summary["wer"] == pytest.approx(jiwer.wer(refs_norm, hyps), abs=1e-12)
    assert summary["cer"] == pytest.approx(jiwer.cer(refs_norm, hyps), abs=1e-12)
    o = jiwer.process_words(refs_norm, hyps)
    assert (summary["substitutions"], summary["insertions"], summary["deletions"]) == (o.substitutions, o.insertions, o.deletions)
    assert summary["wer"] > 0 and summary["worst"][0]["path"] == "nested/deeper/one.ogg"  # says "one", ref "zero"


def test_evaluate_reads_common_voice_tsv(checkpoint, audio_dir, tmp_path, capsys):
    clips = tmp_path / "cv" / "clips"
    clips.mkdir(parents=True)
    shutil.copy(audio_dir / "one.wav", clips / "common_voice_mn_1.wav")
    shutil.copy(audio_dir / "zero.wav", clips / "common_voice_mn_2.wav")
    (tmp_path / "cv" / "test.tsv").write_text(
        "client_id\tpath\tsentence\tup_votes\n"
        "a1\tcommon_voice_mn_1.wav\t\"One\" he said\t2\n"  # a quote that would break csv quoting
        "b2\tcommon_voice_mn_2.wav\tzero\t3\n", encoding="utf-8")
    rc = cli.main(["--model_path", str(checkpoint), "--mode", "evaluate", "--audio_dir", str(tmp_path / "cv"),
                   "--reference_file", str(tmp_path / "cv" / "test.tsv"), "--output_dir", str(tmp_path), *FAST])
    assert rc == 0
    summary = json.loads((tmp_path / "evaluation.json").read_text())
    assert summary["reference_format"] == "common_voice" and summary["n_scored"] == 2
    assert summary["n_ref_words"] == 4 and summary["deletions"] == 2 and summary["wer"] == pytest.approx(0.5)


def test_bad_command_lines_are_clear(checkpoint, audio_dir, tmp_path, capsys):
    cases = [
        (["--mode", "single"], "--mode single needs --audio_path"),
        (["--mode", "batch", "--audio_dir", str(audio_dir), "--batch_size", "0"], "batch_size must be >= 1, got 0"),
        (["--mode", "evaluate", "--audio_dir", str(audio_dir)], "--mode evaluate needs --reference_file"),
        (["--mode", "directory", "--audio_dir", str(tmp_path / "nope")], "nope: no such folder"),
        (["--mode", "single", "--audio_path", str(audio_dir / "zero.wav"), "--beam_size", "0"], "beam_size must be >= 1"),
        (["--mode", "single", "--audio_path", str(audio_dir / "zero.wav"), "--output_format", "doc"], "invalid choice"),
        (["--audio_path", str(audio_dir / "zero.wav"), "--highlight_words"], "--highlight_words True needs --word_timestamps"),
        (["--audio_path", str(audio_dir / "zero.wav"), "--chunk_seconds", "0"], "chunk_seconds must be >= 1, got 0.0"),
        (["--audio_path", str(audio_dir / "zero.wav"), "--vad", "perhaps"], "expected true or false, got 'perhaps'"),
        (["--audio_path", str(audio_dir / "zero.wav"), "--compression_ratio_threshold", "-1"],
         "compression_ratio_threshold must be a finite number > 0, or none, got -1.0"),
        (["--audio_path", str(audio_dir / "zero.wav"), "--logprob_threshold", "nan"],
         "logprob_threshold must be a finite number <= 0, or none, got nan"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            cli.main(["--model_path", str(checkpoint), *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--model_path", str(tmp_path / "missing.pt"), "--mode", "single", "--audio_path", str(audio_dir / "zero.wav")])
    assert "missing.pt: no such file" in capsys.readouterr().err
    for argv, message in [(["--ctc_weight", "0.3"], "--ctc_weight 0.3 needs a model with a CTC head"),
                          (["--word_timestamps"], "--word_timestamps needs a model with a CTC head"),
                          (["--language", "xx"], "'xx' is not one of the model's languages")]:
        assert cli.main(["--model_path", str(checkpoint), "--audio_path", str(audio_dir / "zero.wav"), *argv]) == 2
        assert message in capsys.readouterr().err
    opts = cli.TranscribeOptions(model_path=str(checkpoint), audio_path=str(audio_dir / "zero.wav"))
    assert opts.fallback.temperatures(opts.decoding.temperature) == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def test_bad_outputs_devices_and_reference_files_are_one_line_before_any_decoding(checkpoint, audio_dir, tmp_path,
                                                                                   capsys, monkeypatch):
    monkeypatch.setattr(cli, "RUNNERS", {**cli.RUNNERS, "single": lambda *a: pytest.fail("decoded anyway")})
    (tmp_path / "file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    one = ["--audio_path", str(audio_dir / "zero.wav")]
    for argv, message in [(["--output_file", str(tmp_path / "no" / "out.txt")], f"--output_file {tmp_path}/no/out.txt: no folder"),
                          (["--output_file", str(tmp_path)], "is a folder; give a file name"),
                          (["--output_format", "srt", "--output_dir", str(tmp_path / "file")], "file: exists and is not a folder"),
                          (["--output_format", "srt", "--output_dir", str(tmp_path / "file" / "x")],
                           "file is a file, not a folder"),
                          (["--device", "foo"], "--device foo: not a device name"),
                          (["--device", "meta"], "--device meta: not a device this runs on"),
                          (["--output_format", "srt", "--output_dir", str(tmp_path / "dangling")], "broken symbolic link"),
                          *([(["--device", "cuda"], "--device cuda: no CUDA GPU is available")]
                            if not torch.cuda.is_available() else [])]:
        assert cli.main(["--model_path", str(checkpoint), *one, *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("transcribe.py: error: ") and message in err[0], err
    # a run that fails on its checkpoint creates no output folder on the way
    assert cli.main(["--model_path", str(tmp_path / "file"), *one, "--output_format", "srt",
                     "--output_dir", str(tmp_path / "made" / "here")]) == 2
    assert not (tmp_path / "made").exists()
    capsys.readouterr()
    # reference files: the reader's message (file, line, problem) as one line, exit 2
    zero = audio_dir / "zero.wav"
    for name, text, message in [("empty.tsv", "", "reference file is empty"),
                                ("one.tsv", f"{zero}\n", "one.tsv:1: expected a path and a transcript column"),
                                ("bin.tsv", b"\xff\xfe", "not UTF-8 text"),
                                ("half.tsv", f"path\tfoo\n{zero}\tzero\n", "half.tsv:1: a header needs an audio column"),
                                ("dup.tsv", f"{zero}\tzero\n{zero}\tseven\n",
                                 "zero.wav is listed twice with different transcripts ('zero' and 'seven')")]:
        ref = tmp_path / name
        ref.write_bytes(text) if isinstance(text, bytes) else ref.write_text(text)
        argv = ["--model_path", str(checkpoint), "--mode", "evaluate", "--audio_dir", str(audio_dir),
                "--reference_file", str(ref), "--output_dir", str(tmp_path / "ev"), "--progress", "false"]
        assert cli.main(argv) == 2
        err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("note: ")]
        assert len(err) == 1 and err[0].startswith("transcribe.py: error: ") and message in err[0], err
    same_twice = tmp_path / "same.tsv"
    same_twice.write_text(f"{zero}\tzero\n{zero}\tzero\n")  # nothing lost: read as one reference
    from whisper_scratch.evaluation import resolve_references
    assert resolve_references(same_twice)[0] == {str(zero.resolve()): "zero"}


def test_evaluate_with_a_language_model_and_bad_lm_files(checkpoint, audio_dir, tmp_path, capsys):
    """--lm_path in transcribe.py: fused beam search through evaluate (the report records the
    settings), and an unusable LM file is one line and exit status 2 before any decoding."""
    from whisper_scratch import lm as L
    refs = tmp_path / "refs.tsv"
    refs.write_text("".join(f"{w}.wav\t{w}\n" for w in WORDS))
    model = L.build(WORDS * 3, 3)
    model.normalizer = {"lowercase": True, "punctuation": "strip"}
    model.save(tmp_path / "lm.json.gz")
    args = ["--model_path", str(checkpoint), "--mode", "evaluate", "--audio_dir", str(audio_dir),
            "--reference_file", str(refs), "--beam_size", "2", *FAST]
    rc = cli.main(args + ["--output_dir", str(tmp_path / "r"), "--lm_path", str(tmp_path / "lm.json.gz"), "--lm_weight", "0.5"])
    assert rc == 0 and "WER 0.00 %" in capsys.readouterr().out  # the three words the model fits, with the LM too
    summary = json.loads((tmp_path / "r" / "evaluation.json").read_text())
    assert summary["options"]["decoding"]["lm_weight"] == 0.5 and summary["options"]["decoding"]["lm"] is None
    (tmp_path / "bad.arpa").write_text("hello\n")
    model.normalizer = {"lowercase": False, "punctuation": "keep"}
    model.save(tmp_path / "other.json.gz")
    for bad, says in [("bad.arpa", "not an ARPA file"), ("other.json.gz", "normaliser"), ("none.gz", "not found")]:
        rc = cli.main(args + ["--lm_path", str(tmp_path / bad), "--lm_weight", "0.5"])
        err = [l for l in capsys.readouterr().err.strip().splitlines() if not l.startswith("note: ")]
        assert rc == 2 and len(err) == 1 and err[0].startswith("transcribe.py: error: --lm_path") and says in err[0], err
