"""Training loop: learning, exact resume, accumulation, DDP equivalence, bad input. Tiny data, CPU."""
import copy
import csv
import os
import signal
import socket

import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
import torch.multiprocessing as mp

from whisper_scratch.checkpoint import load_checkpoint, load_model
from whisper_scratch.config import parse_options
from whisper_scratch.data import Collator, read_manifest
from whisper_scratch.tokenizer import build_tokenizer
from whisper_scratch.trainer import Dist, Trainer, TrainOptions, build_batches, get_lr, train
from conftest import DATA

FSDD = str(DATA / "fsdd" / "manifest.tsv")


def write_manifest(path, rows):
    path.write_text("path\ttext\tsplit\n" + "".join(f"{p}\t{t}\t{s}\n" for p, t, s in rows))
    return str(path)


@pytest.fixture
def digits(tmp_path):
    """6 FSDD clips of 6 different digits, the same clips as train and dev split."""
    rec = DATA / "fsdd" / "recordings"
    picks = [f"{d}_jackson_{i}.wav" for d, i in [(0, 5), (1, 6), (2, 7), (3, 8), (4, 9), (5, 10)]]
    words = ["zero", "one", "two", "three", "four", "five"]
    rows = [(str(rec / p), w, s) for p, w in zip(picks, words) for s in ("train", "dev")]
    return write_manifest(tmp_path / "digits.tsv", rows)


def opts(tmp_path, manifest, **kw):
    base = dict(local_data_dir=manifest, language="en", whisper_size="mini", output_dir=str(tmp_path / "out"),
                num_workers=0, progress=False, warmup_steps=20, learning_rate=1e-3, train_batch_size=6,
                max_batch_seconds=None, eval_every=1000, log_every=1, seed=0)
    base.update(kw)
    return TrainOptions(**base)


def test_mini_overfits_a_handful_of_clips_to_cer_zero(tmp_path, digits):
    result = train(opts(tmp_path, digits, max_steps=150, warmup_steps=15, ctc_weight=0.3, eval_every=50))
    assert result["last_eval"]["cer"] == 0.0, result["last_eval"]
    assert result["history"][-1][1] < result["history"][0][1] / 10
    out = tmp_path / "out"
    for name in ("last.pt", "best_model.pt", "metrics.csv", "curves.png"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert any(r["dev_cer"] == "0.0" for r in rows)
    ckpt = torch.load(out / "best_model.pt", weights_only=True)  # tensors and primitives only
    assert {"dims", "tokenizer", "options", "model", "optimizer", "scaler", "sampler", "state", "rng"} <= set(ckpt)
    model, tok, _ = load_model(out / "best_model.pt")
    assert model.dims.ctc and tok.languages == ("en",)
    # the clip lengths long-form chunks are shaped after: the 6 training clips' longest and median
    durations = sorted(sf.info(line.split("\t")[0]).duration for line in open(digits).read().splitlines()[1::2])
    assert ckpt["longest_clip_seconds"] == pytest.approx(durations[-1], abs=1e-3)
    assert ckpt["median_clip_seconds"] == pytest.approx(durations[3], abs=1e-3)


def test_resume_continues_exactly(tmp_path, digits):
    a = train(opts(tmp_path / "a", digits, max_steps=6, train_batch_size=2))
    first = train(opts(tmp_path / "b", digits, max_steps=6, train_batch_size=2, stop_after=3))
    assert first["step"] == 3
    assert load_checkpoint(tmp_path / "b/out/last.pt")["state"]["step"] == 3
    resumed = train(opts(tmp_path / "b", digits, max_steps=6, train_batch_size=2, resume=True))
    full = [h[1] for h in a["history"]]
    assert [h[1] for h in first["history"]] == full[:3]
    assert [h[1] for h in resumed["history"]] == full[3:]  # bit-identical on CPU


def test_accumulation_normalises_by_the_tokens_of_the_whole_step(tmp_path, digits):
    t = Trainer(opts(tmp_path, digits, train_batch_size=6, grad_accum=1, max_steps=5, grad_clip=0))
    col = Collator(t.tokenizer)
    batch = col([t.dataset[i] for i in range(6)])
    # unequal halves with different token counts: `loss / accum` would get this wrong
    halves = [col([t.dataset[i] for i in (0, 1)]), col([t.dataset[i] for i in (2, 3, 4, 5)])]
    start = copy.deepcopy(t.model.state_dict())
    grads = []
    for micro in ([batch], halves):
        t.model.load_state_dict(start)
        t.optimizer.zero_grad()
        t.optimizer.step = lambda: None  # keep the gradients: inspect instead of stepping
        t.optimizer.zero_grad = lambda set_to_none=True: None
        stats = t.step(micro)
        grads.append((stats["ce"], [p.grad.clone() for p in t.model.parameters()]))
        for p in t.model.parameters():
            p.grad = None
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1]))


def test_pad_to_30s_prob_pads_like_the_30s_tools(tmp_path, digits):
    t = Trainer(opts(tmp_path, digits, max_steps=2, pad_to_30s_prob=1.0))
    batch = Collator(t.tokenizer)([t.dataset[i] for i in range(6)])
    batch = {**batch, "mel": F.pad(batch["mel"], (0, 1200 - batch["mel"].shape[-1]))}  # as if 12 s clips
    fills, seen = set(), set()
    for step in range(6):
        t.state.step = step
        padded, rest = t.maybe_pad_to_window(batch, 0)
        # the padded share holds no more frames than the batch did (6 x 1200 -> 2 x 3000)
        assert padded["mel"].shape == (2, 80, 3000) and padded["mel_lens"].tolist() == [3000] * 2
        assert rest["size"] == 4 and sorted(padded["ids"] + rest["ids"]) == sorted(batch["ids"])  # no clip lost
        assert padded["audio_frames"] == sum(int(batch["mel_lens"][batch["ids"].index(i)]) for i in padded["ids"])
        for part in (padded, rest):
            for j, clip in enumerate(part["ids"]):
                b, n = batch["ids"].index(clip), int(batch["mel_lens"][batch["ids"].index(clip)])
                assert torch.equal(part["mel"][j, :, :n], batch["mel"][b, :, :n])
                assert torch.equal(part["targets"][j], batch["targets"][b])
        assert rest["mel_lens"].tolist() == [int(batch["mel_lens"][batch["ids"].index(i)]) for i in rest["ids"]]
        assert rest["mel"].shape[-1] == int(rest["mel_lens"].max())
        for j, clip in enumerate(padded["ids"]):
            n = int(batch["mel_lens"][batch["ids"].index(clip)])
            tail = padded["mel"][j, :, n:]
            assert torch.all(tail == tail[0, 0])  # one fill value per clip
            floor = float(batch["mel"][batch["ids"].index(clip), :, :n].max()) - 2.0
            assert float(tail[0, 0]) in (0.0, pytest.approx(floor))
            fills.add(float(tail[0, 0]) == 0.0)
            seen.add(clip)
    assert fills == {True, False}  # both kinds of padding occur
    assert len(seen) > 2  # which clips are padded changes from step to step
    t0 = Trainer(opts(tmp_path / "z", digits, max_steps=2))
    assert t0.maybe_pad_to_window(batch, 0) == [batch]
    t.state.step = 0
    result = t.run()  # trains through padded batches
    assert result["step"] == 2 and all(torch.isfinite(torch.tensor(h[1])) for h in result["history"])


def test_pad_adapt_steps_follow_the_schedule_and_pick_best_among_adapted(tmp_path, digits):
    t = Trainer(opts(tmp_path, digits, max_steps=2, pad_adapt_steps=2, eval_every=100, warmup_steps=1))
    assert (t.schedule_steps, t.total_steps) == (2, 4)
    assert get_lr(3, t.opts, t.schedule_steps) == pytest.approx(t.opts.learning_rate * t.opts.min_lr_ratio)
    batch = Collator(t.tokenizer)([t.dataset[i] for i in range(4)])
    assert t.maybe_pad_to_window(batch, 0) == [batch]  # in the schedule: P = --pad-to-30s-prob = 0
    t.state.step = 2
    assert t.maybe_pad_to_window(batch, 0)[0]["mel"].shape[-1] == 3000  # adapting: every batch
    t.state.step = 0
    result = t.run()
    assert result["step"] == 4 and t.state.adapting
    # evaluated at the end of the schedule and of adaptation; best_model.pt is the adapted one
    assert load_checkpoint(tmp_path / "out" / "best_model.pt")["state"]["step"] == 4
    with pytest.raises(ValueError, match="-1"):
        TrainOptions(**{**t.opts.__dict__, "pad_adapt_steps": -1})


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(worker, o, n_results: int = 1) -> list:
    """Run worker(rank, 2, port, o, queue) in 2 spawned processes (gloo); what they put in the queue."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=worker, args=(r, 2, port, o, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    if any(p.is_alive() for p in procs):
        for p in procs:
            p.kill()
        pytest.fail("DDP workers did not finish")
    assert [p.exitcode for p in procs] == [0, 0]
    return [queue.get(timeout=10) for _ in range(n_results)]


def _ddp_worker(rank, world, port, o, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = train(o)
    if rank == 0:
        queue.put([h[1] for h in result["history"]])


def test_ddp_two_cpu_processes_match_one_process(tmp_path, digits):
    # global batch per step = 6 clips: 1 process × 2 micro-batches of 3 == 2 ranks × 1 batch of 3
    single = train(opts(tmp_path / "one", digits, max_steps=2, train_batch_size=3, grad_accum=2, num_buckets=1,
                        eval_every=1000))
    o = opts(tmp_path / "two", digits, max_steps=2, train_batch_size=3, grad_accum=1, num_buckets=1)
    losses = run_two_ranks(_ddp_worker, o)[0]
    assert losses[0] == pytest.approx(single["history"][0][1], rel=1e-5)
    assert losses[1] == pytest.approx(single["history"][1][1], rel=1e-4)


def _ddp_position_worker(rank, world, port, o, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    t = Trainer(o)
    t.run()
    queue.put((rank, t.state.step, t.state.epoch, t.state.batches_done, t.state.data_errors))


def test_ddp_rank_with_only_unreadable_clips_stays_in_step(tmp_path):
    """A batch whose every clip fails to load on one rank: that rank runs a zero-weight placeholder
    step, so both ranks consume the same batches per step (else they drift apart, or hang)."""
    rec = DATA / "fsdd" / "recordings"
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF" + os.urandom(2000))  # passes the manifest's cheap check, fails to decode
    clips = [(rec / "0_jackson_5.wav", "zero"), (rec / "1_jackson_6.wav", "one"), (rec / "2_jackson_7.wav", "two"),
             (bad, "three")]
    rows = "".join(f"{p}\t{t}\t0.5\t{s}\n" for p, t in clips for s in ("train", "dev") if s == "train" or p != bad)
    manifest = tmp_path / "m.tsv"
    manifest.write_text("path\ttext\tduration\tsplit\n" + rows)
    o = opts(tmp_path, str(manifest), max_steps=2, train_batch_size=1, num_buckets=1)
    results = sorted(run_two_ranks(_ddp_position_worker, o, n_results=2))
    assert sum(r[4] for r in results) == 1  # the broken clip, counted once
    assert results[0][1:4] == results[1][1:4] == (2, 0, 2)  # step 2 of epoch 0 on both ranks


def test_non_finite_steps_are_skipped_then_stop_with_a_checkpoint(tmp_path, digits):
    t = Trainer(opts(tmp_path, digits, max_steps=50, max_nan_steps=3))
    before = copy.deepcopy(t.model.state_dict())
    real = t.loss_module.forward
    t.loss_module.forward = lambda *a: tuple(x * float("nan") for x in real(*a))
    with pytest.raises(SystemExit, match="3 consecutive steps"):
        t.run()
    assert t.state.nan_skipped == 3
    saved = load_checkpoint(tmp_path / "out" / "last.pt")
    assert all(torch.equal(saved["model"][k], v) for k, v in before.items())  # no NaN reached the weights


def test_ctrl_c_saves_and_exits_cleanly(tmp_path, digits):
    t = Trainer(opts(tmp_path, digits, max_steps=50))
    real = t.step

    def step_then_interrupt(micro):
        stats = real(micro)
        if t.state.step == 2:  # during the 3rd step
            os.kill(os.getpid(), signal.SIGINT)
        return stats

    t.step = step_then_interrupt
    result = t.run()
    assert result["step"] == 3 and result["interrupted"]  # train.py exits 130 on it
    assert load_checkpoint(tmp_path / "out" / "last.pt")["state"]["step"] == 3


def test_resume_says_what_differs_finishes_once_and_refuses_another_seed(tmp_path, digits, capsys):
    train(opts(tmp_path, digits, max_steps=4, eval_every=2, max_eval_utts=2, warmup_steps=2))
    rows = (tmp_path / "out" / "metrics.csv").read_text().count("\n")
    capsys.readouterr()
    result = Trainer(opts(tmp_path, digits, max_steps=4, eval_every=2, max_eval_utts=2, warmup_steps=2,
                          resume=True)).run()  # already finished: nothing decoded or written again
    assert result["step"] == 4 and not result["interrupted"]
    assert "already finished at step 4 of 4; nothing to do" in capsys.readouterr().out
    assert (tmp_path / "out" / "metrics.csv").read_text().count("\n") == rows
    Trainer(opts(tmp_path, digits, max_steps=6, eval_every=2, max_eval_utts=2, warmup_steps=2, learning_rate=1e-2,
                 init_from=str(tmp_path / "out" / "last.pt"), resume=True, output_dir=str(tmp_path / "out") + "/"))
    err = capsys.readouterr().err
    assert "note: --resume with flags that differ from the run's:" in err
    assert "--learning-rate 0.01 (was 0.001)" in err and "--max-steps 6 (was 4)" in err
    assert "--init-from" in err and "ignored on resume" in err
    assert "--output-dir" not in err  # the same folder spelled another way is not a change
    with pytest.raises(SystemExit, match="--resume .*last.pt: sampler state is for seed 0.*resume with the run's --seed"):
        Trainer(opts(tmp_path, digits, max_steps=6, seed=1, resume=True))
    # stopped before its last evaluation (--stop-after), resumed with --max-steps at that step: evaluated, not skipped
    train(opts(tmp_path / "s", digits, max_steps=8, stop_after=5, eval_every=3, max_eval_utts=2, warmup_steps=2))
    capsys.readouterr()
    result = Trainer(opts(tmp_path / "s", digits, max_steps=5, eval_every=3, max_eval_utts=2, warmup_steps=2,
                          resume=True)).run()
    assert "already finished" not in capsys.readouterr().out and result["last_eval"]["step"] == 5
    for flags, message in [(["--time-budget", "nan"], "--time-budget must be a finite number > 0"),
                           (["--max-batch-seconds", "nan"], "--max-batch-seconds must be a finite number >= 30")]:
        with pytest.raises(SystemExit):
            parse_options(TrainOptions, ["--local-data-dir", "D", *flags])
        assert message in capsys.readouterr().err


def test_bad_input_fails_before_any_work(tmp_path, digits, capsys):
    empty = write_manifest(tmp_path / "empty.tsv", [(str(DATA / "fsdd/recordings/0_george_0.wav"), "zero", "dev")])
    with pytest.raises(SystemExit, match="training split 'train'.*is empty"):
        Trainer(opts(tmp_path, empty))
    with pytest.raises(SystemExit):
        parse_options(TrainOptions, ["--eval-batch-size", "0"])
    assert "--eval-batch-size must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_options(TrainOptions, ["--whisper-size", "huge"])
    assert "invalid choice: 'huge'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="fp16 needs a CUDA GPU"):
        Trainer(opts(tmp_path, digits, dtype="fp16", device="cpu"))
    train(opts(tmp_path, digits, max_steps=1, whisper_size="mini"))
    with pytest.raises(SystemExit, match="already holds a checkpoint"):
        Trainer(opts(tmp_path, digits, whisper_size="tiny"))
    with pytest.raises(SystemExit, match="trained with --whisper-size mini, not tiny"):
        Trainer(opts(tmp_path, digits, whisper_size="tiny", resume=True))
    with pytest.raises(SystemExit, match="no such folder"):
        Trainer(opts(tmp_path / "other", str(tmp_path / "nowhere")))
    # setup errors of their own flags: one line each, before the first step
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="--output-dir .*file: exists and is not a folder"):
        Trainer(opts(tmp_path, digits, output_dir=str(tmp_path / "file")))
    with pytest.raises(SystemExit, match="--noise-dir .*nowhere: not a folder"):
        Trainer(opts(tmp_path / "n", digits, noise_dir=str(tmp_path / "nowhere")))
    with pytest.raises(SystemExit, match="--eval-lm-path .*file:1: .*not an ARPA file"):
        Trainer(opts(tmp_path / "lm", digits, eval_lm_path=str(tmp_path / "file"), eval_lm_weight=0.5))
    with pytest.raises(SystemExit, match="--eval-lm-path .*nope.json.gz"):  # weight 0: still read at every evaluation
        Trainer(opts(tmp_path / "lm0", digits, eval_lm_path=str(tmp_path / "nope.json.gz")))


def test_seed_flags_parse_exactly():
    o = parse_options(TrainOptions, ["--local-data-dir", "D", "--whisper-size", "tiny", "--keep-chars", "абв",
                                     "--train-batch-size", "8", "--eval-batch-size", "4", "--num-epochs", "10",
                                     "--learning-rate", "1e-5", "--output-dir", "OUT"])
    assert (o.local_data_dir, o.whisper_size, o.keep_chars, o.train_batch_size, o.eval_batch_size, o.num_epochs,
            o.learning_rate, o.output_dir) == ("D", "tiny", "абв", 8, 4, 10, 1e-5, "OUT")
    o = parse_options(TrainOptions, ["--max_batch_seconds", "60", "--no-lowercase", "--ctc-weight", "0.3"])
    assert o.max_batch_seconds == 60 and o.lowercase is False and o.ctc_weight == 0.3


def test_init_decoder_from_our_checkpoint_fine_tunes_the_whole_model(tmp_path, digits):
    """--init-from one of ours with --init-decoder: its tokenizer and every weight, the token
    embedding and CTC head included, are where the new run starts (fine-tuning on new data)."""
    Trainer(opts(tmp_path, digits, max_steps=2, ctc_weight=0.3)).run()
    source = tmp_path / "out" / "last.pt"
    ckpt = torch.load(source, map_location="cpu", weights_only=False)
    ft = Trainer(opts(tmp_path / "ft", digits, max_steps=1, ctc_weight=0.3, init_from=str(source), init_decoder=True))
    assert ft.tokenizer.to_dict() == ckpt["tokenizer"]
    state = ft.model.state_dict()
    for k, v in ckpt["model"].items():
        assert torch.equal(state[k].cpu(), v), k
    encoder_only = Trainer(opts(tmp_path / "enc", digits, max_steps=1, ctc_weight=0.3, init_from=str(source)))
    assert not torch.equal(encoder_only.model.ctc_head.weight, ckpt["model"]["ctc_head.weight"])
    with pytest.raises(SystemExit, match="--init-decoder fine-tunes .*last.pt with its own char tokenizer"):
        Trainer(opts(tmp_path / "k", digits, init_from=str(source), init_decoder=True, keep_chars="abc"))


def test_init_from_openai_checkpoint_copies_the_encoder(tmp_path, digits):
    from whisper_scratch.model import Whisper, preset_dims
    torch.manual_seed(123)
    donor = Whisper(preset_dims("mini", n_vocab=99))  # another vocabulary: only the encoder fits
    path = tmp_path / "openai.pt"
    dims = {k: v for k, v in donor.dims.to_dict().items() if k != "ctc"}
    torch.save({"dims": dims, "model_state_dict": donor.state_dict()}, path)
    t = Trainer(opts(tmp_path, digits, init_from=str(path), max_steps=1))
    ours = t.model.state_dict()
    for k, v in donor.state_dict().items():
        if k.startswith("encoder."):
            assert torch.equal(ours[k], v), k
    assert not torch.equal(ours["decoder.blocks.0.mlp.0.weight"], donor.state_dict()["decoder.blocks.0.mlp.0.weight"])
    with pytest.raises(SystemExit, match="--init-from"):
        Trainer(opts(tmp_path / "x", digits, init_from=str(tmp_path / "missing.pt")))


def test_speed_perturb_max_sets_the_speeds_and_bad_values_are_rejected(tmp_path, digits):
    o = opts(tmp_path, digits, speed_perturb=True, speed_perturb_max=0.2)
    utts = read_manifest(digits, "train")
    _, dataset = build_batches(o, utts, build_tokenizer("char", [u.text for u in utts], languages=("en",)), 80, Dist())
    assert dataset.augment.speeds == (0.8, 1.0, 1.2)
    with pytest.raises(ValueError, match="speed-perturb-max.*1.5"):
        opts(tmp_path, digits, speed_perturb_max=1.5)


def test_vtlp_and_channel_flags_reach_the_dataset_and_change_its_features(tmp_path, digits):
    utts = read_manifest(digits, "train")
    tok = build_tokenizer("char", [u.text for u in utts], languages=("en",))
    plain = build_batches(opts(tmp_path, digits), utts, tok, 80, Dist())[1]
    o = opts(tmp_path, digits, vtlp_max=0.1, channel_db=10, gain_db=6)
    _, dataset = build_batches(o, utts, tok, 80, Dist())
    assert (dataset.augment.vtlp_max, dataset.augment.channel_db, dataset.augment.gain_db) == (0.1, 10, 6)
    assert dataset[0]["mel"].shape == plain[0]["mel"].shape
    assert not torch.allclose(dataset[0]["mel"], plain[0]["mel"])
    with pytest.raises(ValueError, match="vtlp-max.*0.6"):
        opts(tmp_path, digits, vtlp_max=0.6)
    with pytest.raises(ValueError, match="channel-db.*-3"):
        opts(tmp_path, digits, channel_db=-3)
    with pytest.raises(ValueError, match="gain-db.*50"):
        opts(tmp_path, digits, gain_db=50)
    o = opts(tmp_path, digits, silence_pad_max=0.3, silence_pad_fill="background")
    assert build_batches(o, utts, tok, 80, Dist())[1].augment.silence_pad_fill == "background"
    assert build_batches(opts(tmp_path, digits, silence_pad_prob=1.0), utts, tok, 80, Dist())[1].augment.silence_pad_prob == 1.0
    with pytest.raises(ValueError, match="silence-pad-prob must be in .0, 1., got 1.5"):
        opts(tmp_path, digits, silence_pad_prob=1.5)
    with pytest.raises(ValueError, match="silence-pad-fill must be zeros or background, got 'noise'"):
        opts(tmp_path, digits, silence_pad_fill="noise")


def test_dropout_flag_reaches_every_block_and_is_checked(tmp_path, digits):
    from whisper_scratch.trainer import build_model
    tok = build_tokenizer("char", ["zero one"], languages=("en",))
    model = build_model(opts(tmp_path, digits, dropout=0.1), tok, None, torch.device("cpu"))
    assert {b.dropout for b in [*model.encoder.blocks, *model.decoder.blocks]} == {0.1}
    with pytest.raises(ValueError, match="dropout out of range, got 1.0"):
        opts(tmp_path, digits, dropout=1.0)


def test_feature_norm_flag_builds_the_model_and_resume_keeps_it(tmp_path, digits):
    t = Trainer(opts(tmp_path, digits, feature_norm="meanvar", max_steps=2, eval_every=2))
    assert t.model.dims.feature_norm == "meanvar" and t.model.encoder.feature_norm == "meanvar"
    t.run()
    ckpt = torch.load(tmp_path / "out" / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["dims"]["feature_norm"] == "meanvar"
    with pytest.raises(SystemExit, match="feature-norm meanvar, not none"):
        Trainer(opts(tmp_path, digits, resume=True, max_steps=3))
    openai = tmp_path / "openai.pt"  # an openai-whisper encoder heard plain log-mels
    dims = {k: v for k, v in t.model.dims.to_dict().items() if k not in ("ctc", "feature_norm")}
    torch.save({"dims": dims, "model_state_dict": t.model.state_dict()}, openai)
    with pytest.raises(SystemExit, match="--init-from: .*openai.pt: .*feature_norm none \\(ours meanvar\\)"):
        Trainer(opts(tmp_path / "w", digits, feature_norm="meanvar", init_from=str(openai)))
    ours = Trainer(opts(tmp_path / "w2", digits, feature_norm="meanvar", init_from=str(tmp_path / "out" / "last.pt")))
    assert torch.equal(ours.model.encoder.conv1.weight, t.model.encoder.conv1.weight)  # our own: it fits
    with pytest.raises(ValueError, match="--pad-to-30s-prob 0.5 .*--feature-norm mean"):
        opts(tmp_path, digits, feature_norm="mean", pad_to_30s_prob=0.5)
