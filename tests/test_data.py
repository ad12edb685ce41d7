import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from whisper_scratch import audio as A
from whisper_scratch.augment import (AugmentOptions, add_noise, channel_response, pad_silence, random_gain,
                                    spec_augment, speed_perturb, vtlp)
from whisper_scratch.data import (AsrDataset, Collator, DataReport, DurationBucketSampler, FeatureCache,
                                  filter_for_model, find_cv_language_dir, load_split, make_loader,
                                  read_common_voice, read_manifest, read_references)
from whisper_scratch.tokenizer import CharTokenizer
from conftest import DATA as DATA_ROOT, REPO

CV_HEADER = ["client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes", "down_votes",
             "age", "gender", "accents", "variant", "locale", "segment"]


def tone(seconds, freq=300.0, sr=48000):
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_cv(root, durations_file=True):
    """A tiny Common Voice folder: root/mn/{clips, train/dev/test/validated.tsv, clip_durations.tsv}."""
    lang = root / "mn"
    (lang / "clips").mkdir(parents=True)
    rows = {  # split -> (client, clip, sentence)
        "train": [("spkA", "a1.mp3", 'Сайн "байна" уу'), ("spkB", "b1.mp3", "Нэг хоёр")],
        "dev": [("spkC", "c1.mp3", "Гурав дөрөв")],
        "test": [("spkD", "d1.mp3", "Тав зургаа")],
    }
    extra = [("spkE", "e1.mp3", "Долоо найм"),      # new: kept in validated
             ("spkE", "e2.mp3", "Гурав дөрөв"),     # dev's sentence: removed
             ("spkC", "c2.mp3", "Ес арав"),         # dev's speaker: removed
             ("spkF", "missing.mp3", "Алга")]      # no file: skipped and named
    durs = {}
    for i, (_, clip, _) in enumerate([r for v in rows.values() for r in v] + extra[:3]):
        sec = 1.0 + 0.25 * i
        sf.write(lang / "clips" / clip, tone(sec), 48000, format="MP3", subtype="MPEG_LAYER_III")
        durs[clip] = sec
    rows["validated"] = [r for v in rows.values() for r in v] + extra

    def line(client, clip, sentence):
        vals = dict(client_id=client, path=clip, sentence=sentence, locale="mn")
        return "\t".join(vals.get(c, "") for c in CV_HEADER)

    for split, rs in rows.items():
        (lang / f"{split}.tsv").write_text("\n".join(["\t".join(CV_HEADER)] + [line(*r) for r in rs]) + "\n")
    if durations_file:
        (lang / "clip_durations.tsv").write_text(
            "clip\tduration[ms]\n" + "".join(f"{c}\t{int(d * 1000)}\n" for c, d in durs.items()))
    return lang, durs


def test_common_voice_splits_and_validated_minus_dev_test(tmp_path):
    lang, durs = write_cv(tmp_path / "cv-corpus-16.1")
    report = DataReport()
    for where in (tmp_path / "cv-corpus-16.1", lang):  # corpus root or language folder
        train = read_common_voice(where, "train", "mn", report)
        assert [u.text for u in train] == ['Сайн "байна" уу', "Нэг хоёр"]  # quotes kept verbatim
        assert train[0].duration == durs["a1.mp3"] and train[0].speaker == "spkA"
    validated = read_common_voice(lang, "validated", "mn", report)
    assert sorted(os.path.basename(u.audio) for u in validated) == ["a1.mp3", "b1.mp3", "e1.mp3"]
    assert any("missing.mp3" in n for n in report.skipped["audio file missing"])


def test_durations_from_header_without_clip_durations(tmp_path):
    lang, durs = write_cv(tmp_path, durations_file=False)
    (lang / "clips" / "b1.mp3").write_bytes(b"\xff\xfbgarbage" * 10)  # corrupt
    (lang / "clips" / "a1.mp3").write_bytes(b"")  # empty
    report = DataReport()
    assert read_common_voice(lang, "train", report=report) == []
    dev = read_common_voice(lang, "dev", report=report)
    assert dev[0].duration == pytest.approx(durs["c1.mp3"], abs=0.03)
    assert any("a1.mp3" in n for n in report.skipped["audio file empty"])
    assert any("b1.mp3" in n for n in report.skipped["audio file unreadable"])
    summary = report.summary()
    assert "a1.mp3" in summary and "b1.mp3" in summary


def test_bad_common_voice_folders_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        find_cv_language_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"expected .*clips/"):
        find_cv_language_dir(tmp_path)
    lang, _ = write_cv(tmp_path)
    (lang / "dev.tsv").write_text("client_id\tfile\tsentence\nx\ty\tz\n")
    with pytest.raises(ValueError, match=r"dev.tsv:1: missing column\(s\) \['path'\]"):
        read_common_voice(lang, "dev")
    with pytest.raises(ValueError, match="'training'"):
        read_common_voice(lang, "training")


def test_fsdd_manifest_loads_as_is(data_dir):
    report = DataReport()
    train = read_manifest(data_dir / "fsdd/manifest.tsv", "train", report)
    test = load_split(data_dir / "fsdd/manifest.tsv", "test", report=report)
    assert len(train) == 2250 and len(test) == 250 and report.num_skipped == 0
    assert train[0].text in {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    assert os.path.isfile(train[0].audio) and train[0].speaker


def test_jsonl_manifest_and_bad_rows(tmp_path):
    sf.write(tmp_path / "x.wav", tone(1.0, sr=16000), 16000)
    lines = [json.dumps({"audio": "x.wav", "text": "сайн", "speaker": "s"}), "{not json",
             json.dumps({"audio": "x.wav"}), json.dumps({"audio": "gone.wav", "text": "a"})]
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    report = DataReport()
    utts = read_manifest(tmp_path / "m.jsonl", report=report)
    assert len(utts) == 1 and utts[0].duration == pytest.approx(1.0)
    assert len(report.skipped["unreadable row"]) == 2 and len(report.skipped["audio file missing"]) == 1
    (tmp_path / "bad.tsv").write_text("file\twords\na\tb\n")
    with pytest.raises(ValueError, match="bad.tsv: needs an audio column"):
        read_manifest(tmp_path / "bad.tsv")


def test_filter_for_model_counts_what_it_skips(tmp_path):
    from whisper_scratch.data import Utterance
    tok = CharTokenizer("абв")
    utts = [Utterance("ok", "/x/ok.wav", "аб", 2.0), Utterance("long", "/x/long.wav", "а", 31.0),
            Utterance("wordy", "/x/wordy.wav", "а" * 40, 3.0), Utterance("oov", "/x/oov.wav", "агд", 1.0),
            Utterance("short", "/x/short.wav", "а", 0.012), Utterance("enough", "/x/enough.wav", "а", 0.013)]
    report = DataReport()
    kept = filter_for_model(utts, tok, n_text_ctx=20, report=report)
    assert [u.id for u in kept] == ["ok", "oov", "enough"]  # 208 samples feed the STFT, 192 do not
    assert report.skipped["audio shorter than 12.6 ms"] == ["/x/short.wav"]
    assert report.skipped["audio longer than 30 s"] == ["/x/long.wav"]
    assert report.skipped["transcript longer than the decoder context (20 tokens)"] == ["/x/wordy.wav"]
    assert report.oov == {"г": 1, "д": 1}


DURS = list(np.random.default_rng(0).uniform(0.5, 12.0, 403))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sampler_covers_each_clip_once_across_ranks_within_budget(world_size):
    seen = []
    lengths = set()
    for rank in range(world_size):
        s = DurationBucketSampler(DURS, max_batch_seconds=40, max_batch_size=16, seed=3, rank=rank,
                                  world_size=world_size)
        s.set_epoch(2)
        batches = list(s)
        lengths.add(len(batches))
        for b in batches:
            assert len(b) <= 16 and len(b) * max(DURS[i] for i in b) <= 40 + 1e-9
            seen.extend(b)
    assert sorted(seen) == list(range(len(DURS)))
    assert len(lengths) == 1  # every rank runs the same number of steps


def test_sampler_is_deterministic_and_reshuffles_per_epoch():
    a = DurationBucketSampler(DURS, max_batch_seconds=30, seed=1)
    b = DurationBucketSampler(DURS, max_batch_seconds=30, seed=1)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    assert list(DurationBucketSampler(DURS, max_batch_seconds=30, seed=2)) != list(a)
    # bucketing: padding waste is small compared with random batching
    waste = sum(len(x) * max(DURS[i] for i in x) - sum(DURS[i] for i in x) for x in a)
    assert waste < 0.15 * sum(DURS)


def test_sampler_resume_mid_epoch_gives_the_same_remaining_batches():
    s = DurationBucketSampler(DURS, max_batch_seconds=25, max_batch_size=8, seed=5, world_size=2, rank=1)
    s.set_epoch(4)
    full = list(s)
    state = s.state_dict(batches_done=7)
    fresh = DurationBucketSampler(DURS, max_batch_seconds=25, max_batch_size=8, seed=5, world_size=2, rank=1)
    fresh.load_state_dict(state)
    assert list(fresh) == full[7:] and len(fresh) == len(full) - 7
    fresh.set_epoch(5)  # the next epoch starts from its beginning
    assert len(list(fresh)) == len(fresh) > 0
    with pytest.raises(ValueError, match="seed 5"):
        DurationBucketSampler(DURS, max_batch_seconds=25, seed=6, world_size=2, rank=1).load_state_dict(state)


def test_train_batch_size_alone_is_a_count_cap():
    batches = list(DurationBucketSampler(DURS, max_batch_size=8, seed=0))
    assert max(len(b) for b in batches) == 8 and sum(map(len, batches)) == len(DURS)


def test_sampler_rejects_bad_values():
    with pytest.raises(ValueError, match="-1"):
        DurationBucketSampler(DURS, max_batch_seconds=-1)
    with pytest.raises(ValueError, match="longer than max_batch_seconds=5"):
        DurationBucketSampler(DURS, max_batch_seconds=5)
    with pytest.raises(ValueError, match="empty"):
        DurationBucketSampler([], max_batch_size=4)


@pytest.fixture
def small_corpus(data_dir):
    utts = read_manifest(data_dir / "fsdd/manifest.tsv", "test")[:6]
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz", languages=("en",))
    return utts, tok


def test_collation_pads_to_the_longest_clip_and_masks_prompt(small_corpus):
    utts, tok = small_corpus
    ds = AsrDataset(utts, tok)
    items = [ds[i] for i in range(4)]
    batch = Collator(tok)(items)
    lens = [int(round(u.duration * 16000)) // 160 for u in utts[:4]]
    assert batch["mel"].shape == (4, 80, max(lens)) and batch["mel_lens"].tolist() == lens
    assert min(lens) < max(lens), "the clips must differ in length for padding to be tested"
    for b, (n, item) in enumerate(zip(lens, items)):  # every clip, whichever is the longest
        assert torch.equal(batch["mel"][b, :, :n], item["mel"])
        assert (batch["mel"][b, :, n:] == 0).all()
    prompt = tok.sot_sequence()
    for b, u in enumerate(utts[:4]):
        text = tok.encode(u.text)
        n = len(prompt) + len(text)
        assert batch["tokens_in"][b, :n].tolist() == list(prompt) + text
        assert batch["targets"][b, len(prompt) - 1:n].tolist() == text + [tok.eot]
        assert (batch["targets"][b, : len(prompt) - 1] == tok.pad).all()
        assert (batch["targets"][b, n:] == tok.pad).all() and (batch["tokens_in"][b, n:] == tok.pad).all()


def test_unreadable_clip_at_load_time_is_dropped_and_named(tmp_path, small_corpus):
    utts, tok = small_corpus
    from dataclasses import replace
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF" + b"\x00" * 100)
    utts = [utts[0], replace(utts[1], audio=str(bad)), utts[2]]
    sampler = DurationBucketSampler([u.duration for u in utts], max_batch_size=3, num_buckets=1, shuffle=False)
    batch = next(iter(make_loader(AsrDataset(utts, tok), sampler)))
    assert batch["size"] == 2 and len(batch["errors"]) == 1 and "bad.wav" in batch["errors"][0]


@pytest.mark.parametrize("cache", [False, True])
def test_a_clip_whose_real_length_breaks_the_limits_is_a_named_skip(tmp_path, small_corpus, cache):
    """The manifest's duration can be wrong: a clip really under the STFT's minimum or over 30 s
    is skipped and named (not a crash in the STFT, not a clip cut under its whole transcript)."""
    utts, tok = small_corpus
    from dataclasses import replace
    sf.write(tmp_path / "tiny.wav", tone(0.005, sr=16000), 16000)
    sf.write(tmp_path / "long.wav", tone(31.0, sr=16000), 16000)
    utts = [utts[0], replace(utts[1], audio=str(tmp_path / "tiny.wav")), replace(utts[2], audio=str(tmp_path / "long.wav"))]
    ds = AsrDataset(utts, tok, cache_dir=str(tmp_path / "cache") if cache else None)
    assert "mel" in ds[0]
    assert "tiny.wav: too short: 5.0 ms" in ds[1]["error"]
    assert "long.wav: longer than 30 s (31.0 s" in ds[2]["error"]


def test_speed_perturbation_never_pushes_a_clip_past_the_limits(tmp_path):
    from whisper_scratch.data import clip_audio
    sf.write(tmp_path / "edge.wav", tone(0.013, sr=16000), 16000)  # 208 samples: 189 at speed 1.1
    sf.write(tmp_path / "full.wav", tone(29.0, sr=16000), 16000)  # 32.2 s at speed 0.9
    sf.write(tmp_path / "mid.wav", tone(1.0, sr=16000), 16000)
    assert len(clip_audio(tmp_path / "edge.wav", 1.1)) == 208  # not sped up, rather than too short for the STFT
    assert len(clip_audio(tmp_path / "full.wav", 0.9)) == 29 * 16000  # not slowed down, rather than cut
    assert len(clip_audio(tmp_path / "mid.wav", 0.9)) == round(16000 / 0.9)  # others as asked


def test_noise_files_that_are_not_audio_are_refused_up_front(tmp_path, small_corpus):
    utts, tok = small_corpus
    (tmp_path / "noise").mkdir()
    sf.write(tmp_path / "noise/good.wav", tone(1.0, sr=16000), 16000)
    (tmp_path / "noise/text.wav").write_text("not audio")
    with pytest.raises(ValueError, match=r"1 of 2 files are not usable audio.*text\.wav"):
        AsrDataset(utts, tok, augment=AugmentOptions(noise_dir=str(tmp_path / "noise")))


def test_an_undecodable_noise_file_leaves_augmentation_deterministic(tmp_path, small_corpus, monkeypatch):
    """A noise file whose header reads but whose data does not: the clips that draw it train
    without noise, the same whatever order or worker the items come in (no per-process state
    changes which file a draw picks)."""
    import whisper_scratch.augment as aug_mod
    utts, tok = small_corpus
    (tmp_path / "noise").mkdir()
    for i in range(3):
        sf.write(tmp_path / f"noise/n{i}.wav", tone(1.0, 200.0 * (i + 1), sr=16000), 16000)
    real = aug_mod.load_audio
    monkeypatch.setattr(aug_mod, "load_audio", lambda p, *a: (_ for _ in ()).throw(A.AudioError(f"{p}: bad data"))
                        if p.name == "n1.wav" else real(p, *a))
    opts = AugmentOptions(noise_dir=str(tmp_path / "noise"), noise_prob=1.0)
    forward, backward = AsrDataset(utts, tok, augment=opts, seed=3), AsrDataset(utts, tok, augment=opts, seed=3)
    with pytest.warns(UserWarning, match="n1.wav: bad data; the clips that draw it train without noise"):
        a = [forward[i]["mel"] for i in range(len(utts))]
        b = [backward[i]["mel"] for i in reversed(range(len(utts)))][::-1]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_feature_cache_matches_and_invalidates(tmp_path, small_corpus):
    utts, _ = small_corpus
    src = tmp_path / "clip.wav"
    sf.write(src, A.load_audio(utts[0].audio), 16000)
    cache = FeatureCache(tmp_path / "cache", 80)
    first = cache.get(str(src))
    again = cache.get(str(src))
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 1
    assert torch.allclose(again, A.log_mel_spectrogram(str(src)), atol=2e-3)  # fp16 on disk
    assert cache.key(str(src)) != FeatureCache(tmp_path / "cache", 128).key(str(src))
    assert cache.key(str(src)) != cache.key(str(src), speed=1.1)
    other = A.load_audio(utts[1].audio)
    assert len(other) != len(A.load_audio(str(src)))  # a different size: a new key whatever the mtime
    sf.write(src, other, 16000)  # file changes -> new key, new features
    changed = cache.get(str(src))
    assert changed.shape != first.shape or not torch.allclose(changed, first)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 2


def test_dataset_with_cache_equals_without(tmp_path, small_corpus):
    utts, tok = small_corpus
    plain, cached = AsrDataset(utts, tok), AsrDataset(utts, tok, cache_dir=str(tmp_path / "c"))
    for i in range(3):
        for _ in range(2):
            assert torch.allclose(plain[i]["mel"], cached[i]["mel"], atol=2e-3)


def test_augmentations(small_corpus, tmp_path):
    rng = np.random.default_rng(0)
    x = tone(2.0, sr=16000)
    assert abs(len(speed_perturb(x, 1.1)) - len(x) / 1.1) <= 1
    assert abs(len(speed_perturb(x, 0.9)) - len(x) / 0.9) <= 1
    noise = np.random.default_rng(1).standard_normal(5000).astype(np.float32)
    noisy = add_noise(x, noise, 10.0, rng)
    snr = 10 * np.log10(np.mean(x ** 2) / np.mean((noisy - x) ** 2))
    assert snr == pytest.approx(10.0, abs=0.01)
    mel = torch.randn(80, 300)
    masked = spec_augment(mel, AugmentOptions(spec_augment=True, freq_masks=2, time_masks=4), rng)
    changed = (masked != mel)
    assert changed.any() and changed.float().mean() < 0.6
    # bin_mean (models with --feature-norm): masked cells get their bin's mean over the unmasked
    # frames, so each bin's mean (what a normalising encoder subtracts) is that of the frames left
    tilted = mel + torch.linspace(-3, 3, 80)[:, None]
    masked = spec_augment(tilted, AugmentOptions(spec_augment=True, freq_masks=0, time_masks=6, mask_fill="bin_mean"),
                          np.random.default_rng(3))
    kept = (masked == tilted).all(0)
    assert 0 < kept.sum() < 300 and torch.allclose(masked.mean(-1), tilted[:, kept].mean(-1), atol=1e-5)
    with pytest.raises(ValueError, match="mask_fill must be .* got 'zero'"):
        AugmentOptions(mask_fill="zero")
    # deterministic per (seed, epoch, item) and different across epochs
    utts, tok = small_corpus
    (tmp_path / "noise").mkdir()
    sf.write(tmp_path / "noise/n.wav", noise, 16000)
    opts = AugmentOptions(spec_augment=True, speed_perturb=True, noise_dir=str(tmp_path / "noise"), noise_prob=1.0)
    a, b = AsrDataset(utts, tok, augment=opts, seed=7), AsrDataset(utts, tok, augment=opts, seed=7)
    assert torch.equal(a[0]["mel"], b[0]["mel"])
    b.set_epoch(1)
    assert not (a[0]["mel"].shape == b[0]["mel"].shape and torch.equal(a[0]["mel"], b[0]["mel"]))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        AsrDataset(utts, tok, augment=AugmentOptions(noise_dir=str(tmp_path / "none")))


@pytest.mark.parametrize("alpha, hz", [(1.1, 1100), (0.9, 900), (1.2, 1200)])
def test_vtlp_moves_a_tone_where_the_warped_tone_lies(alpha, hz):
    """Warping a 1 kHz tone's log-mel by alpha must put its energy in the bins of an alpha kHz tone:
    closer to that tone's log-mel than the unwarped one is, and with the same loudest bin."""
    mel = A.log_mel_spectrogram(tone(1.0, 1000, 16000))
    ref = A.log_mel_spectrogram(tone(1.0, hz, 16000))
    warped = vtlp(mel, alpha)
    assert warped.shape == mel.shape and torch.equal(vtlp(mel, 1.0), mel)
    assert warped.mean(1).argmax() == ref.mean(1).argmax() != mel.mean(1).argmax()

    def centre(m):  # the power-weighted mean mel bin
        power = 10 ** (4 * m.mean(1).double())
        return float((power * torch.arange(80)).sum() / power.sum())
    assert abs(centre(warped) - centre(ref)) < 0.3 * abs(centre(mel) - centre(ref)), \
        (centre(mel), centre(warped), centre(ref))


def test_channel_response_is_a_bounded_smooth_gain_over_frequency(data_dir):
    mel = A.log_mel_spectrogram(data_dir / "samples/jfk/jfk.flac")[:, :300]
    speech = mel > mel.max() - 1.5  # cells well above the floor keep the gain exactly
    for seed in range(5):
        out = channel_response(mel, 12.0, np.random.default_rng(seed))
        gain = (out - mel) * 40  # dB
        assert gain[speech].abs().max() <= 12.0 + 1e-3
        assert out.min() >= out.max() - 2.0 - 1e-6  # the max - 8 floor, taken again
        per_bin = [gain[b][speech[b]] for b in range(80)]
        for b, g in enumerate(per_bin):  # the same gain in every frame of a bin
            if len(g) > 1:
                assert g.max() - g.min() < 1e-3, b
        bins = [b for b in range(80) if len(per_bin[b])]
        steps = [abs(per_bin[b][0] - per_bin[b - 1][0]) for b in bins if b - 1 in bins]
        assert max(steps) < 12.0 * 3 * np.pi / 79 * 1.01, "a smooth curve: three cosines at most"
    a, b = (channel_response(mel, 12.0, np.random.default_rng(3)) for _ in range(2))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="channel_db"):
        AugmentOptions(channel_db=-1)
    with pytest.raises(ValueError, match="vtlp_max"):
        AugmentOptions(vtlp_max=0.7)


def test_random_gain_equals_scaling_the_waveform():
    """A gain of g dB on the log-mel must be what the waveform times 10^(g/20) gives."""
    wav = tone(1.0, 440, 16000)
    mel = A.log_mel_spectrogram(wav)
    rng = np.random.default_rng(4)
    g = float(np.random.default_rng(4).uniform(-12, 12))
    assert abs(g) > 1
    louder = A.log_mel_spectrogram(wav * 10 ** (g / 20))
    assert torch.allclose(random_gain(mel, 12.0, rng), louder, atol=1e-4)
    with pytest.raises(ValueError, match="gain_db"):
        AugmentOptions(gain_db=-1)


def test_silence_padding_on_the_mel_equals_zeros_around_the_waveform():
    """pad_silence works on (cached) log-mels; it must give what zero samples before and after the
    waveform give, away from the STFT's border frames, and never grow a clip past max_frames."""
    speech = np.concatenate([tone(0.8, 300, 16000), tone(0.7, 700, 16000)])
    mel = A.log_mel_spectrogram(speech)
    rng = np.random.default_rng(1)
    padded = pad_silence(mel, 0.5, A.N_FRAMES, rng)
    before = int(np.random.default_rng(1).uniform(0, 0.5) * 100)
    after = padded.shape[-1] - mel.shape[-1] - before
    assert before > 5 and after > 5, (before, after)
    assert torch.equal(padded[:, before:before + mel.shape[-1]], mel)
    wav = np.concatenate([np.zeros(before * 160, np.float32), speech, np.zeros(after * 160, np.float32)])
    ref = A.log_mel_spectrogram(wav)
    assert ref.shape[-1] == padded.shape[-1]
    inner = list(range(before - 2)) + list(range(padded.shape[-1] - after + 2, padded.shape[-1]))
    assert torch.allclose(padded[:, inner], ref[:, inner], atol=1e-4)
    full = pad_silence(torch.zeros(80, A.N_FRAMES - 10), 2.0, A.N_FRAMES, np.random.default_rng(0))
    assert full.shape[-1] <= A.N_FRAMES
    with pytest.raises(ValueError, match="silence_pad_max"):
        AugmentOptions(silence_pad_max=-1)


def test_background_padding_repeats_the_clips_quietest_frames():
    """fill "background" pads with the recording's own noise floor (its quietest tenth of frames),
    not digital silence; a clip that holds digital silence gets exactly what fill "zeros" gives."""
    rng = np.random.default_rng(3)
    speech = 0.3 * rng.standard_normal(8000)  # broadband, 40 dB above the floor
    noisy = np.concatenate([0.003 * rng.standard_normal(4000), speech, 0.003 * rng.standard_normal(4000)])
    mel = A.log_mel_spectrogram(noisy.astype(np.float32))
    padded = pad_silence(mel, 0.5, A.N_FRAMES, np.random.default_rng(1), fill="background")
    before = int(np.random.default_rng(1).uniform(0, 0.5) * 100)
    after = padded.shape[-1] - mel.shape[-1] - before
    assert before > 5 and after > 5, (before, after)
    assert torch.equal(padded[:, before:before + mel.shape[-1]], mel)
    pad = torch.cat([padded[:, :before], padded[:, -after:]], dim=-1)
    quiet = mel.mean(0).sort().values[: mel.shape[-1] // 10]
    assert pad.mean(0).max() <= quiet.max() + 1e-6  # only the quietest frames
    assert pad.mean() > mel.max() - 2 + 0.1  # the noise floor, above digital silence
    silent = A.log_mel_spectrogram(np.concatenate([np.zeros(8000), speech]).astype(np.float32))
    assert torch.equal(pad_silence(silent, 0.5, A.N_FRAMES, np.random.default_rng(1), fill="background"),
                       pad_silence(silent, 0.5, A.N_FRAMES, np.random.default_rng(1)))
    with pytest.raises(ValueError, match="silence_pad_fill"):
        AugmentOptions(silence_pad_fill="noise")


def test_summary_prints_hours_of_every_split(tmp_path, data_dir, capsys):
    from whisper_scratch.data import main
    write_cv(tmp_path)
    main([str(tmp_path)])
    out = capsys.readouterr().out
    for split in ("train 2 clips", "dev 1 clips", "test 1 clips", "validated 3 clips"):
        assert split in out
    assert "missing.mp3" in out and " h" in out
    main([str(data_dir / "fsdd/manifest.tsv")])
    assert "test 250 clips 0.03 h | train 2,250 clips 0.26 h" in capsys.readouterr().out


# -- Common Voice as it really ships: validated.tsv and clips/ only (shared/data/cv_sample) -------
CV_SAMPLE = DATA_ROOT / "cv_sample"


def carved(lang_dir, carve=(0.1, 0.1)):
    report = DataReport()
    splits = {s: read_common_voice(lang_dir, s, lang_dir.name, report, carve) for s in ("train", "dev", "test")}
    return splits, report


@pytest.mark.parametrize("lang", ["ky", "en"])
def test_cv_sample_carves_speaker_and_sentence_disjoint_splits(lang):
    splits, report = carved(CV_SAMPLE / lang)
    rows = (CV_SAMPLE / lang / "validated.tsv").read_text(encoding="utf-8").splitlines()[1:]
    speaker_of = {r.split("\t")[1]: r.split("\t")[0] for r in rows}
    clips = {s: {os.path.basename(u.audio) for u in us} for s, us in splits.items()}
    dropped = sum(len(v) for k, v in report.skipped.items() if k.startswith("carved"))
    assert sum(map(len, clips.values())) + dropped == len(rows) == 100  # every clip in one split or counted
    assert 5 <= len(clips["dev"]) <= 10 and 5 <= len(clips["test"]) <= 10  # asked for 10 % each
    speakers = {s: {speaker_of[c] for c in cs} for s, cs in clips.items()}
    sentences = {s: {u.text for u in us} for s, us in splits.items()}
    for a, b in [("train", "dev"), ("train", "test"), ("dev", "test")]:
        assert not speakers[a] & speakers[b] and not sentences[a] & sentences[b], (a, b)
    assert all(u.speaker == speaker_of[os.path.basename(u.audio)] for us in splits.values() for u in us)
    assert len(report.notes) == 1 and "carved from validated.tsv" in report.notes[0]
    assert f"dev {len(clips['dev'])} clips of {len(speakers['dev'])} speakers" in report.notes[0]
    again, _ = carved(CV_SAMPLE / lang)
    assert again == splits  # deterministic
    bigger, _ = carved(CV_SAMPLE / lang, (0.3, 0.2))
    assert 20 <= len(bigger["dev"]) <= 30 and len(bigger["train"]) < len(splits["train"])


def test_carve_is_the_same_in_another_process_with_another_hash_seed():
    code = ("from whisper_scratch.data import read_common_voice as r; import sys; "
            "print(sorted(u.id for u in r(sys.argv[1], 'dev', 'ky')))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code, str(CV_SAMPLE / "ky")], env=env, capture_output=True,
                         text=True, cwd=REPO, check=True).stdout.strip()
    assert out == str(sorted(u.id for u in read_common_voice(CV_SAMPLE / "ky", "dev", "ky")))


def test_carved_splits_keep_sentences_apart_and_count_what_they_drop(tmp_path):
    """Two speakers read the same sentence: whichever split takes the first, the other's clip is
    dropped from its later split (dev, then test, then train) and counted."""
    lang = tmp_path / "xx"
    (lang / "clips").mkdir(parents=True)
    lines = ["client_id\tpath\tsentence\tup_votes\textra"]
    for i in range(40):
        sf.write(lang / "clips" / f"c{i}.wav", tone(0.5, sr=16000), 16000)
        lines.append(f"spk{i % 20}\tc{i}.wav\t{'same words' if i % 20 < 2 else f'sentence {i}'}\t2\tx")
    (lang / "validated.tsv").write_text("\n".join(lines) + "\n")
    splits, report = carved(lang, (0.25, 0.25))
    dropped = [n for k, v in report.skipped.items() if k.startswith("carved") for n in v]
    texts = [u.text for us in splits.values() for u in us]
    assert texts.count("same words") == 2 and len(dropped) == 2  # 4 readings: the first speaker's split keeps its 2
    assert sum(map(len, splits.values())) == 38
    with pytest.raises(ValueError, match="--carve-dev 0.6 / --carve-test 0.5"):
        read_common_voice(lang, "train", "xx", carve=(0.6, 0.5))


def test_csv_quoting_is_detected_per_file(tmp_path):
    """en/validated.tsv was written with CSV quoting: the sentence comes out unwrapped, inner
    quotes single. A file with bare quotes (even one that looks wrapped) is read as written."""
    en = CV_SAMPLE / "en"
    utts = {os.path.basename(u.audio): u.text for s in ("train", "dev", "test")
            for u in read_common_voice(en, s, "en")}
    assert utts["common_voice_en_23557246.mp3"] == 'He saw cinema as "plastic art in motion".'
    assert utts["common_voice_en_23376208.mp3"] == 'These feasts were of two kinds, "public" and "private".'
    refs = dict(read_references(en / "validated.tsv")[0])
    assert refs["common_voice_en_23557246.mp3"] == 'He saw cinema as "plastic art in motion".'
    bare = tmp_path / "test.tsv"
    bare.write_text('client_id\tpath\tsentence\na\t1.wav\t"Quoted whole."\nb\t2.wav\t"One" he said\n'
                    'c\t3.wav\tsays ""twice""\n', encoding="utf-8")
    assert read_references(bare)[0] == [("1.wav", '"Quoted whole."'), ("2.wav", '"One" he said'),
                                        ("3.wav", 'says ""twice""')]
    quoted = tmp_path / "quoted.tsv"
    quoted.write_bytes('\ufeffpath\ttext\r\n1.wav\t"a ""b"" c"\r\n2.wav\tplain\r\n'.encode("utf-8"))  # BOM, CRLF
    assert read_references(quoted) == ([("1.wav", 'a "b" c'), ("2.wav", "plain")], "manifest")


def test_other_tsv_files_and_extra_columns_are_ignored(tmp_path):
    lang = tmp_path / "ky"
    lang.mkdir()
    (lang / "clips").symlink_to(CV_SAMPLE / "ky" / "clips")
    rows = (CV_SAMPLE / "ky" / "validated.tsv").read_text(encoding="utf-8").splitlines()
    (lang / "validated.tsv").write_text("\n".join(r + "\tmore\tcolumns" for r in rows) + "\n", encoding="utf-8")
    (lang / "other.tsv").write_bytes(b"\xff\xfe not even text")
    (lang / "invalidated.tsv").write_text("nonsense\n")
    (lang / "reported.tsv").write_text("sentence\treason\nx\ty\n")
    assert carved(lang)[0] == carved(CV_SAMPLE / "ky")[0]


def test_without_clip_durations_each_clip_costs_one_header_read(tmp_path, monkeypatch):
    calls = []
    real = A.audio_duration
    monkeypatch.setattr(A, "audio_duration", lambda p: calls.append(p) or real(p))
    dev = read_common_voice(CV_SAMPLE / "ky", "dev", "ky")
    assert len(calls) == len(dev) and all(u.duration > 1 for u in dev)
    lang = tmp_path / "ky"
    lang.mkdir()
    (lang / "clips").symlink_to(CV_SAMPLE / "ky" / "clips")
    (lang / "validated.tsv").symlink_to(CV_SAMPLE / "ky" / "validated.tsv")
    (lang / "clip_durations.tsv").write_text("clip\tduration[ms]\n" + "".join(
        f"{os.path.basename(u.audio)}\t{round(u.duration * 1000)}\n" for u in dev[1:]) + "bad.mp3\tlong\n")
    calls.clear()
    report = DataReport()
    again = read_common_voice(lang, "dev", "ky", report)
    assert len(calls) == 1 and [u.id for u in again] == [u.id for u in dev]  # only the clip not listed
    assert report.skipped["clip_durations.tsv row unreadable (duration read from the audio header)"] == [
        f"clip_durations.tsv:{len(dev) + 1}"]


def test_a_short_training_run_on_the_real_cv_sample(tmp_path, monkeypatch):
    """ky/ as shipped trains end to end: carved splits, MP3 at 48 kHz, a dev evaluation, checkpoints."""
    from whisper_scratch import model
    from whisper_scratch.checkpoint import load_model
    from whisper_scratch.trainer import TrainOptions, train
    monkeypatch.setitem(model.PRESETS, "mini", (64, 2, 2))  # tiny dims: seconds on a CPU
    result = train(TrainOptions(local_data_dir=str(CV_SAMPLE), language="ky", whisper_size="mini", max_steps=2,
                                train_batch_size=2, max_batch_seconds=None, num_workers=0, progress=False,
                                max_eval_utts=2, eval_every=2, warmup_steps=1, output_dir=str(tmp_path / "out")))
    assert result["step"] == 2 and result["last_eval"]["step"] == 2 and "cer" in result["last_eval"]
    _, tok, ckpt = load_model(tmp_path / "out" / "best_model.pt")
    assert tok.languages == ("ky",) and ckpt["state"]["step"] == 2
