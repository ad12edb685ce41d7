import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from whisper_scratch import audio as A
from whisper_scratch.augment import AugmentOptions, add_noise, spec_augment, speed_perturb
from whisper_scratch.data import (AsrDataset, Collator, DataReport, DurationBucketSampler, FeatureCache,
                                  filter_for_model, find_cv_language_dir, load_split, make_loader,
                                  read_common_voice, read_manifest)
from whisper_scratch.tokenizer import CharTokenizer

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
    with pytest.raises(ValueError, match=r"dev.tsv: missing column\(s\) \['path'\]"):
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
