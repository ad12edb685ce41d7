"""Voice-activity chunks: the merge rule (cut at the longest pause, never longer than the limit),
silero-vad on real Common Voice speech joined into long recordings, and silence."""
import csv

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from whisper_scratch.audio import SAMPLE_RATE, load_audio
from whisper_scratch.vad import VadOptions, check_against_clips, merge_regions, speech_chunks
from conftest import DATA


# -- merge_regions: pure ---------------------------------------------------------------------

def test_regions_that_fit_become_one_chunk_with_their_pauses():
    assert merge_regions([(100, 200), (300, 400), (450, 900)], 1000) == [(100, 900)]


def test_the_cut_is_at_the_longest_pause():
    # pauses of 100, 500 and 50 samples: a 1000-sample limit forces one cut, at the 500 one
    regions = [(0, 300), (400, 700), (1200, 1500), (1550, 1700)]
    assert merge_regions(regions, 1000) == [(0, 700), (1200, 1700)]


def test_chunks_over_the_target_are_cut_at_long_pauses_only():
    # two "sentences" 300 samples apart, each with a 50-sample pause inside: within the limit,
    # over the target, so cut at the long pause; not at the short ones (below split_pause)
    regions = [(0, 400), (450, 900), (1200, 1600), (1650, 2000)]
    assert merge_regions(regions, 5000) == [(0, 2000)]
    assert merge_regions(regions, 5000, target_len=1000, split_pause=200) == [(0, 900), (1200, 2000)]
    assert merge_regions(regions, 5000, target_len=500, split_pause=200) == [(0, 900), (1200, 2000)]
    assert merge_regions(regions, 5000, target_len=500, split_pause=40) == [(0, 400), (450, 900), (1200, 1600),
                                                                             (1650, 2000)]


def test_a_region_longer_than_the_limit_is_cut_into_equal_parts():
    assert merge_regions([(0, 2500)], 1000) == [(0, 833), (833, 1666), (1666, 2500)]
    assert merge_regions([], 1000) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5000), st.integers(1, 3000)), min_size=1, max_size=30),
       st.integers(200, 4000), st.one_of(st.none(), st.integers(100, 3000)), st.integers(0, 1000))
def test_chunks_are_short_ordered_and_keep_every_sample_of_speech(raw, max_len, target, split_pause):
    regions, t = [], 0
    for gap, length in raw:  # disjoint, sorted regions
        regions.append((t + gap, t + gap + length))
        t += gap + length
    chunks = merge_regions(regions, max_len, target, split_pause)
    assert all(0 < b - a <= max_len for a, b in chunks)
    assert all(b1 <= a2 for (_, b1), (a2, _) in zip(chunks, chunks[1:]))
    covered = sum(max(0, min(b, y) - max(a, x)) for a, b in regions for x, y in chunks)
    assert covered == sum(b - a for a, b in regions)
    # a cut between two regions is never inside one: each region lies in one chunk unless it alone is too long
    for a, b in regions:
        if b - a <= max_len:
            assert any(x <= a and b <= y for x, y in chunks), (a, b, chunks)


# -- silero-vad ------------------------------------------------------------------------------

def test_importing_silero_keeps_our_thread_count():
    """silero_vad's import runs torch.set_num_threads(1); import it afresh and check ours stays."""
    import sys
    from whisper_scratch import vad
    for name in [m for m in sys.modules if m == "silero_vad" or m.startswith("silero_vad.")]:
        del sys.modules[name]
    vad._model = None
    torch.set_num_threads(2)
    before = torch.get_num_threads()
    vad.speech_probabilities(np.zeros(SAMPLE_RATE, np.float32))
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("kind", ["zeros", "noise"])
def test_silence_and_noise_give_no_chunk(kind):
    rng = np.random.default_rng(0)
    audio = np.zeros(20 * SAMPLE_RATE, np.float32) if kind == "zeros" else \
        (0.05 * rng.standard_normal(20 * SAMPLE_RATE)).astype(np.float32)
    assert speech_chunks(audio, 10.0) == []
    assert speech_chunks(audio[:SAMPLE_RATE * 3], 10.0) == []  # a short file too


def joined_clips(lang: str, n: int, gap_s: float = 0.5):
    """n Common Voice clips of `lang` joined with gap_s of digital silence: (audio, clip offsets, clips)."""
    folder = DATA / "cv_sample" / lang
    with open(folder / "validated.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))[:n]
    clips = [load_audio(folder / "clips" / r["path"]) for r in rows]
    gap = np.zeros(int(gap_s * SAMPLE_RATE), np.float32)
    offsets = np.cumsum([0] + [len(c) + len(gap) for c in clips[:-1]])
    return np.concatenate([x for c in clips for x in (c, gap)]), offsets, clips


@pytest.mark.parametrize("lang", ["en", "sah"])
def test_real_speech_is_found_and_never_cut_inside_a_word(lang):
    """≈ 60 s of real recordings (microphones, rooms, leading/trailing silence) joined: chunks of
    at most 10 s hold ≥ 85 % of every clip's speech (silero on the clip alone, unpadded), and no
    chunk edge falls inside a speech region of any clip."""
    audio, offsets, clips = joined_clips(lang, 10)
    assert len(audio) > 45 * SAMPLE_RATE
    chunks = speech_chunks(audio, 10.0)
    assert all(b - a <= 10 * SAMPLE_RATE for a, b in chunks)
    for i, (kept, inside) in enumerate(check_against_clips(chunks, offsets, clips)):
        assert kept >= 0.85, f"clip {i}: only {kept:.0%} of its speech is in a chunk"
        assert not inside, f"clip {i}: chunk edges at {[e / SAMPLE_RATE for e in inside]} s cut its speech"


def test_a_short_file_with_speech_is_one_chunk_as_is():
    clip = load_audio(DATA / "fsdd" / "recordings" / "3_theo_1.wav")
    assert speech_chunks(clip, 10.0) == [(0, len(clip))]


def test_bad_vad_options_are_rejected_with_the_value():
    with pytest.raises(ValueError, match="chunk_seconds must be >= 1, got 0.5"):
        VadOptions(chunk_seconds=0.5)
    with pytest.raises(ValueError, match="vad_threshold must be in"):
        VadOptions(vad_threshold=1.5)


def test_the_clip_check_sees_a_cut_word_and_lost_speech():
    audio, offsets, clips = joined_clips("en", 2)
    mid = offsets[0] + len(clips[0]) // 2
    (kept0, inside0), (kept1, inside1) = check_against_clips([(0, mid)], offsets, clips)
    assert 0.2 < kept0 < 0.8 and inside0 == [mid]
    assert kept1 == 0 and inside1 == []


def test_batched_speech_probabilities_equal_one_by_one():
    from whisper_scratch.vad import speech_probabilities, speech_probabilities_many
    _, _, clips = joined_clips("ru", 5)
    clips = clips + [clips[0][:3000], np.zeros(SAMPLE_RATE, np.float32)]
    alone = [speech_probabilities(c) for c in clips]
    for max_samples in (10 ** 9, 3 * 8 * SAMPLE_RATE):  # one batch; several
        together = speech_probabilities_many(clips, max_samples)
        for a, b in zip(alone, together):
            assert a.shape == b.shape and np.abs(a - b).max() < 1e-4


def test_short_inputs_are_scored_only_until_speech_is_found_and_chunked_the_same():
    from whisper_scratch.vad import FRAME, PROBE, chunking_probabilities, speech_probabilities
    _, _, clips = joined_clips("ru", 4)
    late = np.concatenate([np.zeros(2 * SAMPLE_RATE, np.float32), clips[0]])  # speech after the first second
    audios = clips + [late, np.zeros(3 * SAMPLE_RATE, np.float32), np.concatenate(clips)]
    whole = max(len(a) for a in audios[:-1])  # every input but the joined one is decoded whole
    got = chunking_probabilities(audios, whole / SAMPLE_RATE, 0.5)
    full = [speech_probabilities(a) for a in audios]
    for a, g, f in zip(audios, got, full):
        assert np.abs(g - f[:len(g)]).max() < 1e-4
        assert speech_chunks(a, whole / SAMPLE_RATE, VadOptions(), g) == speech_chunks(a, whole / SAMPLE_RATE,
                                                                                         VadOptions(), f)
    assert all(len(g) == PROBE // FRAME for g in got[:len(clips)])  # speech in the first second: that is all
    assert [len(g) for g in got[len(clips):]] == [len(f) for f in full[len(clips):]]  # late, silent, long
    assert speech_chunks(audios[-2], whole / SAMPLE_RATE, VadOptions(), got[-2]) == []


def test_silero_is_causal_so_no_silence_is_needed_after_the_audio():
    """A frame's speech probability does not depend on what follows it (vad.LEAD_IN's comment)."""
    from whisper_scratch.vad import speech_probabilities
    _, _, clips = joined_clips("en", 3)
    for clip in clips:
        longer = np.concatenate([clip, np.zeros(SAMPLE_RATE, np.float32), clip[:SAMPLE_RATE]])
        a, b = speech_probabilities(clip), speech_probabilities(longer)
        n = len(clip) // 512  # whole frames: the last partial one is zero-padded in one, not the other
        assert np.abs(a[:n] - b[:n]).max() < 1e-6


def test_chunk_lengths_come_from_the_checkpoint_where_the_flags_leave_them_unset():
    from whisper_scratch.vad import with_checkpoint_chunks
    ckpt = {"longest_clip_seconds": 12.27, "median_clip_seconds": 5.16}
    got = with_checkpoint_chunks(VadOptions(), ckpt)
    assert (got.chunk_seconds, got.target_seconds) == (12.27, 5.16)
    got = with_checkpoint_chunks(VadOptions(chunk_seconds=8.0), ckpt)  # a flag wins, the other still comes
    assert (got.chunk_seconds, got.target_seconds) == (8.0, 5.16)
    assert with_checkpoint_chunks(VadOptions(), {}) == VadOptions()  # an older checkpoint: nothing to add
    assert with_checkpoint_chunks(VadOptions(vad=False), ckpt) == VadOptions(vad=False)
