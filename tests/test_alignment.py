"""CTC forced alignment: the exact path on hand-built emissions, brute force on small random ones,
words with times from a character tokenizer."""
import itertools
import math

import pytest
import numpy as np
import torch

from whisper_scratch.alignment import ctc_viterbi, word_timestamps
from whisper_scratch.tokenizer import CharTokenizer


def emissions(path, V, p=0.9):
    """log-probs (T, V) whose most likely symbol at frame t is path[t] (probability p)."""
    lp = torch.full((len(path), V), math.log((1 - p) / (V - 1)))
    lp[torch.arange(len(path)), torch.tensor(path)] = math.log(p)
    return lp


def test_hand_built_path_with_a_repeated_token():
    blank = 4
    path = [blank, blank, 1, 1, blank, 1, 1, 2, blank, blank]  # "1 1 2": the repeat needs the blank at 4
    assert ctc_viterbi(emissions(path, 5), [1, 1, 2], blank) == [(2, 3), (5, 6), (7, 7)]
    assert ctc_viterbi(emissions([3, 0, 0, 2], 5), [3, 0, 2], blank) == [(0, 0), (1, 2), (3, 3)]  # no blanks at all
    with pytest.raises(ValueError, match="cannot align 2 tokens .1 repeated. to 2 frames"):
        ctc_viterbi(emissions([1, 1], 5), [1, 1], blank)
    assert ctc_viterbi(emissions([blank], 5), [], blank) == []


def _collapse(path, blank):
    out = [s for i, s in enumerate(path) if s != blank and (i == 0 or s != path[i - 1])]
    return out


def test_viterbi_finds_the_best_path_by_brute_force():
    """Every CTC path of 6 frames over 3 symbols: the best one that collapses to the tokens must
    score what Viterbi's spans score."""
    gen = torch.Generator().manual_seed(0)
    blank, T = 2, 6
    for trial in range(20):
        lp = torch.randn(T, 3, generator=gen).log_softmax(-1)
        tokens = [[0, 1], [1, 1], [0], [1, 0, 1]][trial % 4]
        best, best_path = -math.inf, None
        for path in itertools.product(range(3), repeat=T):
            if _collapse(path, blank) == tokens:
                score = float(sum(lp[t, s] for t, s in enumerate(path)))
                if score > best:
                    best, best_path = score, path
        spans = ctc_viterbi(lp, tokens, blank)
        ours = [blank] * T
        for k, (a, b) in enumerate(spans):
            ours[a:b + 1] = [tokens[k]] * (b - a + 1)
        assert _collapse(ours, blank) == tokens
        assert float(sum(lp[t, s] for t, s in enumerate(ours))) == pytest.approx(best, abs=1e-5), (trial, best_path)


def test_words_get_times_from_their_characters():
    tok = CharTokenizer("abc", languages=("en",))
    a, b, c = (tok.encode(ch)[0] for ch in "abc")
    space = tok.encode("a b")[1]  # the normaliser strips a lone space
    blank, V = tok.pad, tok.vocab_size
    # "ab c": a at frames 1-2, b at 3, a pause (blank) 4-6, space at 7, c at 8-9
    path = [blank, a, a, b, blank, blank, blank, space, c, c, blank]
    words = word_timestamps(emissions(path, V), tok.encode("ab c"), tok, frame_seconds=0.02, offset=10.0)
    assert [w["word"] for w in words] == ["ab", "c"]
    assert (words[0]["start"], words[0]["end"]) == (10.02, 10.08)
    assert (words[1]["start"], words[1]["end"]) == (10.16, 10.2)
    assert all(w["probability"] == pytest.approx(0.9, abs=1e-3) for w in words)
    # c ends on the last CTC frame; when the segment's audio ends 10 ms into that frame, so does c
    path = [blank, a, a, b, blank, blank, blank, space, c, c]
    words = word_timestamps(emissions(path, V), tok.encode("ab c"), tok, frame_seconds=0.02, offset=10.0, end=10.19)
    assert (words[1]["start"], words[1]["end"]) == (10.16, 10.19)


def test_transcripts_get_words_inside_their_segments():
    """A random tiny model with a CTC head on 40 s of noise (two windows): every segment's words are
    the words of its text, in order, within the segment's time span."""
    from whisper_scratch.decoding import NO_FALLBACK, DecodingOptions
    from whisper_scratch.longform import transcribe
    from whisper_scratch.model import ModelDimensions, Whisper

    tok = CharTokenizer("ab", languages=("en",))
    torch.manual_seed(0)
    model = Whisper(ModelDimensions(80, 1500, 32, 4, 2, tok.vocab_size, 48, 32, 4, 2, ctc=True)).eval()
    audio = torch.randn(40 * 16000, generator=torch.Generator().manual_seed(1)).numpy() * 0.1
    result = transcribe(model, audio, tok, DecodingOptions(max_new_tokens=12), NO_FALLBACK, word_timestamps=True)
    assert len(result["segments"]) == 2
    n_words = 0
    for seg in result["segments"]:
        words = seg["words"]
        assert [w["word"] for w in words] == seg["text"].split()
        assert all(seg["start"] <= w["start"] < w["end"] <= seg["end"] + 0.02 for w in words), (seg, words)
        assert all(a["end"] <= b["start"] for a, b in zip(words, words[1:]))
        assert all(0 < w["probability"] <= 1 for w in words)
        n_words += len(words)
    assert n_words > 0  # the random model does emit words, so the checks above are not vacuous
    no_ctc = Whisper(ModelDimensions(80, 1500, 32, 4, 2, tok.vocab_size, 48, 32, 4, 2, ctc=False)).eval()
    with pytest.raises(ValueError, match="CTC head"):
        transcribe(no_ctc, audio[:16000], tok, DecodingOptions(max_new_tokens=4), NO_FALLBACK, word_timestamps=True)


def test_batched_files_get_the_same_words_as_one_by_one(tmp_path):
    """transcribe_files (short files decoded together) aligns each file on its own frames: the
    words equal those of transcribe() on that file alone."""
    import soundfile as sf
    from whisper_scratch.decoding import NO_FALLBACK, DecodingOptions
    from whisper_scratch.longform import transcribe, transcribe_files
    from whisper_scratch.model import ModelDimensions, Whisper

    tok = CharTokenizer("ab", languages=("en",))
    torch.manual_seed(0)
    model = Whisper(ModelDimensions(80, 1500, 32, 4, 2, tok.vocab_size, 48, 32, 4, 2, ctc=True)).eval()
    gen = torch.Generator().manual_seed(2)
    paths = []
    for i, seconds in enumerate((1.0, 2.5)):
        paths.append(tmp_path / f"{i}.wav")
        sf.write(paths[-1], (torch.randn(int(seconds * 16000), generator=gen) * 0.1).numpy(), 16000)
    options = DecodingOptions(max_new_tokens=8)
    batched = dict(transcribe_files(model, paths, tok, options, NO_FALLBACK, batch_size=2, word_timestamps=True))
    for p in paths:
        alone = transcribe(model, p, tok, options, NO_FALLBACK, word_timestamps=True)
        got = batched[str(p)]["segments"][0]
        assert [w["word"] for w in got["words"]] == [w["word"] for w in alone["segments"][0]["words"]]
        assert [(w["start"], w["end"]) for w in got["words"]] == [
            (w["start"], w["end"]) for w in alone["segments"][0]["words"]]
    assert any(r["segments"][0]["words"] for r in batched.values())  # not vacuous


# -- word boundaries on real speech, from a CTC head trained here ------------------------------

DIGITS = ["zero", "one", "two"]


@pytest.fixture(scope="module")
def ctc_digit_model():
    """A tiny model (2 s context) fitted on three FSDD digits, each at a random offset in a 2 s
    window: first the decoder with cross-entropy, then the CTC head alone on the encoder it left
    (train.py's joint loss takes far longer to leave the text prior on 3 clips)."""
    from conftest import DATA
    from whisper_scratch.audio import load_audio, log_mel_spectrogram
    from whisper_scratch.model import ModelDimensions, Whisper
    from whisper_scratch.trainer import LossModule

    tok = CharTokenizer("zerontw", languages=("en",))
    clips = [load_audio(DATA / f"fsdd/recordings/{d}_george_5.wav") for d in range(3)]
    clips = [0.5 * c / np.abs(c).max() for c in clips]
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = Whisper(ModelDimensions(80, 100, 64, 4, 2, tok.vocab_size, 16, 64, 4, 2, ctc=True))
    sot = list(tok.sot_sequence())

    def batch():
        mels, tokens, targets = [], torch.full((6, 8), tok.pad), torch.full((6, 8), tok.pad)
        for i, (clip, word) in enumerate((c, w) for c, w in zip(clips, DIGITS) for _ in range(2)):
            window = np.zeros(2 * 16000, np.float32)
            off = rng.integers(0, len(window) - len(clip))
            window[off:off + len(clip)] = clip
            mels.append(log_mel_spectrogram(window))
            s = sot + tok.encode(word) + [tok.eot]
            tokens[i, :len(s) - 1] = torch.tensor(s[:-1])
            targets[i, len(sot) - 1:len(s) - 1] = torch.tensor(s[len(sot):])
        return torch.stack(mels), torch.full((6,), 200), tokens, targets

    for ctc_weight, params, steps in ((0.0, model.parameters(), 120), (1.0, model.ctc_head.parameters(), 150)):
        loss_fn = LossModule(model, tok.pad, tok.n_text, 0.0, ctc_weight)
        opt = torch.optim.AdamW(params, lr=3e-3 if ctc_weight == 0 else 3e-2)
        for step in range(steps):
            mel, lens, tokens, targets = batch()
            loss, _, _ = loss_fn(mel, lens, tokens, targets)
            opt.zero_grad()
            (loss / (targets != tok.pad).sum()).backward()
            opt.step()
    return model.eval(), tok, clips


def speech_extent(clip: np.ndarray) -> tuple:
    """(first, last) second of the 10 ms frames within 20 dB of the clip's loudest."""
    frames = clip[: len(clip) // 160 * 160].reshape(-1, 160)
    energy = 10 * np.log10((frames ** 2).mean(1) + 1e-12)
    loud = np.flatnonzero(energy > energy.max() - 20)
    return loud[0] * 0.01, (loud[-1] + 1) * 0.01


def test_word_boundaries_on_concatenated_clips(ctc_digit_model):
    """15 digits joined with known 0.8-1.5 s gaps, decoded through voice-activity chunks with word
    timestamps: every word found in order, and its start and end near the clip's loud part."""
    from whisper_scratch.decoding import NO_FALLBACK, DecodingOptions
    from whisper_scratch.longform import transcribe
    from whisper_scratch.vad import VadOptions

    model, tok, clips = ctc_digit_model
    rng = np.random.default_rng(3)
    order = [int(d) for d in rng.integers(0, 3, 15)]
    parts, truth, t = [], [], 0.0
    for d in order:
        gap = np.zeros(int(rng.uniform(0.8, 1.5) * 16000), np.float32)
        a, b = speech_extent(clips[d])
        truth.append((t + len(gap) / 16000 + a, t + len(gap) / 16000 + b))
        parts += [gap, clips[d].astype(np.float32)]
        t += (len(gap) + len(clips[d])) / 16000
    audio = np.concatenate(parts + [np.zeros(16000, np.float32)])
    result = transcribe(model, audio, tok, DecodingOptions(max_new_tokens=8), NO_FALLBACK, word_timestamps=True,
                        vad=VadOptions(chunk_seconds=2.0, speech_pad_ms=300))  # it was trained on silence-padded words
    words = [w for s in result["segments"] for w in s["words"]]
    assert [w["word"] for w in words] == [DIGITS[d] for d in order]
    errors = np.array([(abs(w["start"] - a), abs(w["end"] - b)) for w, (a, b) in zip(words, truth)])
    median = np.median(errors, axis=0)
    report = (f"median word-boundary error: start {1000 * median[0]:.0f} ms, end {1000 * median[1]:.0f} ms; "
              f"worst {1000 * errors.max():.0f} ms")
    print(report)
    assert median.max() <= 0.1 and errors.max() <= 0.3, report
