"""Averaged weights and the time budget: evaluation snapshots kept and pruned, their mean exact
and loadable, mismatched runs refused; the EMA's arithmetic, its files, its exact resume; and
--time-budget's schedule from measured step and evaluation costs (on a fake clock: tests never
time), kept on resume."""
import csv

import pytest
import torch

import test_train
import whisper_scratch.trainer as T
from whisper_scratch import average as A
from whisper_scratch.checkpoint import atomic_save, load_checkpoint, load_model
from whisper_scratch.trainer import TrainOptions, train

digits, opts = test_train.digits, test_train.opts  # the fixture (6 FSDD clips) and the tiny run's options


def test_snapshots_are_kept_pruned_and_averaged_exactly(tmp_path, digits, capsys):
    train(opts(tmp_path, digits, max_steps=6, train_batch_size=2, eval_every=2, keep_checkpoints=2, ctc_weight=0.3,
                max_eval_utts=2))
    out = tmp_path / "out"
    assert [s for s, _ in A.snapshots(out)] == [4, 6]  # step-2 pruned
    snap = load_checkpoint(out / A.snapshot_name(6))
    assert snap["step"] == 6 and 0 <= snap["dev"]["cer"] and "optimizer" not in snap
    assert A.main(["--dir", str(out), "--last", "2", "--output", str(out / "avg.pt")]) == 0
    assert "averaged 2 checkpoints" in capsys.readouterr().err
    avg, a, b = (load_checkpoint(out / n)["model"] for n in ("avg.pt", A.snapshot_name(4), A.snapshot_name(6)))
    for k in avg:
        assert torch.allclose(avg[k], (a[k].double() + b[k].double()).div(2).float(), atol=1e-7), k
    assert not torch.equal(a["decoder.token_embedding.weight"], b["decoder.token_embedding.weight"])
    model, tok, ck = load_model(out / "avg.pt")  # a normal checkpoint: transcribe.py and the exports take it
    assert ck["averaged_from"] == [str(out / A.snapshot_name(4)), str(out / A.snapshot_name(6))]
    best = min(A.snapshots(out), key=lambda sp: (load_checkpoint(sp[1])["dev"]["cer"], sp[0]))[1]
    assert A.choose(out, best=1)[0].name == best.name


def test_averaging_refuses_checkpoints_of_different_runs(tmp_path, digits, capsys):
    train(opts(tmp_path, digits, max_steps=2, train_batch_size=2, eval_every=1, keep_checkpoints=2, max_eval_utts=1))
    out = tmp_path / "out"
    (_, a), (_, b) = A.snapshots(out)
    other = load_checkpoint(b)
    other["tokenizer"] = {**other["tokenizer"], "alphabet": "xyz"}
    atomic_save(other, tmp_path / "other.pt")
    assert A.main(["--checkpoints", str(a), str(tmp_path / "other.pt"), "--output", str(tmp_path / "x.pt")]) == 2
    assert "other.pt: its tokenizer differ" in capsys.readouterr().err
    assert A.main(["--dir", str(tmp_path), "--last", "2", "--output", str(tmp_path / "x.pt")]) == 2
    assert "no step-*.pt evaluation snapshots" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        A.main(["--last", "2", "--output", "x.pt"])  # --last needs --dir: a usage error naming it
    assert "give --dir" in capsys.readouterr().err
    # a separately trained model (weights drawn anew), the same file twice, weights named otherwise: refused
    elsewhere = load_checkpoint(b)
    g = torch.Generator().manual_seed(1)
    elsewhere["model"] = {k: torch.randn(v.shape, generator=g) * v.std() if v.ndim >= 2 else v
                          for k, v in elsewhere["model"].items()}
    atomic_save(elsewhere, tmp_path / "elsewhere.pt")
    assert A.weight_cosine(load_checkpoint(a)["model"], load_checkpoint(b)["model"]) > 0.8  # one run's snapshots
    missing = load_checkpoint(b)
    del missing["model"]["encoder.positional_embedding"]
    atomic_save(missing, tmp_path / "missing.pt")
    diverged = load_checkpoint(b)
    diverged["model"]["decoder.ln.weight"][0] = float("nan")
    atomic_save(diverged, tmp_path / "diverged.pt")
    for argv, message in [([str(a), str(tmp_path / "elsewhere.pt")], "its weights are far from"),
                          ([str(a), str(a)], "given twice"),
                          ([str(a), str(tmp_path / "missing.pt")], "differ: encoder.positional_embedding"),
                          ([str(a), str(tmp_path / "diverged.pt")], "diverged.pt: NaN or inf in its weights (decoder.ln")]:
        assert A.main(["--checkpoints", *argv, "--output", str(tmp_path / "x.pt")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
    assert A.main(["--checkpoints", str(a), str(tmp_path / "elsewhere.pt"), "--mix-runs", "--output",
                   str(tmp_path / "x.pt")]) == 0  # fine-tunes of one checkpoint may be mixed on purpose
    for argv, message in [(["--dir", str(tmp_path / "nowhere"), "--last", "2"], "nowhere: no such folder"),
                          (["--checkpoints", str(a), "--output", str(tmp_path / "x.pt" / "y.pt")], "x.pt is a file"),
                          (["--checkpoints", str(a), "--output", str(tmp_path)], "is a folder")]:
        argv = argv if "--output" in argv else [*argv, "--output", str(tmp_path / "z.pt")]
        assert A.main(argv) == 2
        assert message in capsys.readouterr().err
    assert A.main(["--dir", str(out), "--last", "5", "--output", str(tmp_path / "z.pt")]) == 0
    assert "holds 2 snapshot(s) to choose from, fewer than the 5 asked; averaging 2" in capsys.readouterr().err


def test_ema_is_the_decayed_mean_and_is_restored_around_evaluation():
    lin = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(0.0)
    ema = A.Ema(lin, decay=0.5)
    expected = 0.0
    for n, w in enumerate([1.0, 2.0, 3.0], 1):
        with torch.no_grad():
            lin.weight.fill_(w)
        ema.update(lin)
        d = min(0.5, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * w
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), expected))
    with ema.applied(lin):
        assert torch.allclose(lin.weight, torch.full((1, 2), expected))
    assert torch.equal(lin.weight, torch.full((1, 2), 3.0))


def test_ema_files_metrics_and_exact_resume(tmp_path, digits):
    kw = dict(max_steps=6, train_batch_size=2, eval_every=3, ema_decay=0.9, keep_checkpoints=0, max_eval_utts=2)
    train(opts(tmp_path / "a", digits, **kw))
    train(opts(tmp_path / "b", digits, stop_after=3, **kw))
    train(opts(tmp_path / "b", digits, resume=True, **kw))
    for run in ("a", "b"):
        out = tmp_path / run / "out"
        assert (out / "ema.pt").is_file() and (out / "best_ema.pt").is_file() and not A.snapshots(out)
        rows = [r for r in csv.DictReader(open(out / "metrics.csv")) if r["ema_dev_cer"]]
        assert [int(r["step"]) for r in rows] == [3, 6]
    ema_a, ema_b, raw = (load_checkpoint(tmp_path / p)["model"] for p in ("a/out/ema.pt", "b/out/ema.pt", "a/out/last.pt"))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)  # the average survives the resume exactly
    assert not torch.equal(ema_a["decoder.token_embedding.weight"], raw["decoder.token_embedding.weight"])


class FakeClock:
    """The trainer's clock: 2 s per optimizer step, 0.5 s per decoded dev clip."""

    def __init__(self):
        self.now = 0.0

    def time(self):
        return self.now


def budget_run(monkeypatch, tmp_path, digits, step_seconds=lambda step: 2.0, plans=None, clock=None, **kw):
    """A --time-budget run on a fake clock (`clock`, or a new one): each step costs
    step_seconds(step), each decoded dev clip 0.5 s; `plans` collects the schedule length seen at
    every step."""
    clock = clock or FakeClock()
    monkeypatch.setattr(T, "time", clock)
    evaluate = T.dev_evaluate

    def timed_step(self, micro):  # the schedule is under test, not learning: no forward/backward
        clock.now += step_seconds(self.state.step)
        if plans is not None:
            plans.append(self.state.budget_steps)
        lr = T.get_lr(self.state.step, self.opts, self.schedule_steps)
        return {"lr": lr, "ce": 1.0, "ctc": 0.0, "finite": True, "audio_s": 1.0, "tokens": 1, "gnorm": 0.0}

    def timed_evaluate(model, tokenizer, utts, o, amp, max_new_tokens=None):
        clock.now += 0.5 * len(utts)
        return evaluate(model, tokenizer, utts, o, amp, max_new_tokens)

    monkeypatch.setattr(T.Trainer, "step", timed_step)
    monkeypatch.setattr(T, "dev_evaluate", timed_evaluate)
    o = opts(tmp_path, digits, **{"time_budget": 1.5, "warmup_steps": 30, "train_batch_size": 2,
                                  "keep_checkpoints": 0, "max_eval_utts": 2, **kw})
    return train(o), o


def test_time_budget_sets_the_schedule_from_measured_costs(monkeypatch, tmp_path, digits, capsys):
    # measured: 2 s/step (steps 3-23); the probe decodes the 6 dev clips in 3 s, so an evaluation
    # of 2 (--max-eval-utts) costs 1 s; 90 - 49 = 41 s left. 33 steps: 10 x 2 s + 2 evaluations
    # = 22 s fits; 43 steps (42 s) would not
    result, _ = budget_run(monkeypatch, tmp_path / "a", digits)
    ckpt = load_checkpoint(tmp_path / "a/out/last.pt")
    assert result["step"] == 33 and ckpt["state"]["budget_steps"] == 33
    assert ("note: 33 steps are fewer than twice --warmup-steps 30: the learning rate climbs for 30 of them and "
            "decays in the 3 left") in capsys.readouterr().out
    # a fifth of the steps as padding adaptation at 1.8x a step: 33 + 7 steps (47.2 s) do not fit
    result, _ = budget_run(monkeypatch, tmp_path / "b", digits, pad_adapt_fraction=0.2)
    state = load_checkpoint(tmp_path / "b/out/last.pt")["state"]
    assert (result["step"], state["budget_steps"], state["budget_adapt_steps"]) == (28, 23, 5) and state["adapting"]


def test_time_budget_is_kept_on_resume_and_validated(monkeypatch, tmp_path, digits):
    result, o = budget_run(monkeypatch, tmp_path, digits, stop_after=25)
    assert result["step"] == 25
    t = T.Trainer(TrainOptions(**{**o.__dict__, "stop_after": None, "resume": True}))
    assert (t.schedule_steps, t.total_steps) == (33, 33)  # not measured again: the resumed run keeps it
    for bad, match in [({"max_steps": 10}, "cannot be used with --max-steps"), ({"time_budget": 0}, "finite number > 0 of minutes"),
                       ({"pad_adapt_fraction": 0.2, "pad_adapt_steps": 5}, "not both"),
                       ({"time_budget": None, "pad_adapt_fraction": 0.2}, "needs --time-budget")]:
        with pytest.raises(ValueError, match=match):
            TrainOptions(**{**o.__dict__, **bad})


def test_time_budget_is_fitted_again_when_steps_slow_down(monkeypatch, tmp_path, digits):
    # the warm-up measures 2 s/step, then every step from 30 on takes 4 s: the first fit is far too
    # long, and the evaluation at step 50 (every 10 steps) shortens the schedule so the run ends
    # within its 3 minutes
    plans, clock = [], FakeClock()
    result, _ = budget_run(monkeypatch, tmp_path, digits, lambda step: 2.0 if step < 30 else 4.0, plans, clock,
                           time_budget=3, eval_every=10)
    first = next(p for p in plans if p)
    state = load_checkpoint(tmp_path / "out/last.pt")["state"]
    assert state["budget_steps"] == result["step"] < first, (first, state["budget_steps"], result["step"])
    assert clock.now <= 180, f"the run took {clock.now:.0f} s of a 180 s budget (first fit {first} steps)"
