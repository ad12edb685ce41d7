"""What a training run tells the user: metrics.csv, TensorBoard, curves.png and the opening and
closing summaries. Rank 0 writes; the other ranks' logs do nothing."""
from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

CSV_FIELDS = ["step", "epoch", "lr", "train_loss", "train_ctc", "dev_wer", "dev_cer", "ema_dev_wer", "ema_dev_cer",
              "audio_sec_per_sec", "tokens", "elapsed_s"]


class TrainLog:
    """metrics.csv (always), TensorBoard (when installed), a progress bar, curves.png at the end.
    Training rows average the finite steps since the last row (a NaN step is counted, not averaged)."""

    def __init__(self, out: Path, enabled: bool, resume: bool, total_steps: int, step: int, progress: bool,
                 log_every: int, ctc: bool):
        self.enabled, self.log_every, self.ctc = enabled, log_every, ctc
        self.csv_path = out / "metrics.csv"
        self.start = time.time()
        self.bar = tqdm(total=total_steps, initial=step, disable=not (progress and enabled), unit="step",
                        dynamic_ncols=True, mininterval=1.0)
        self._reset_window()
        self.tb = None
        if not enabled:
            return
        new = not (resume and self.csv_path.is_file())
        if not new:  # rows past the checkpoint were logged by a run that died before saving it
            self.start -= keep_rows_up_to(self.csv_path, step)
        self.csv_file = open(self.csv_path, "w" if new else "a", newline="")
        self.csv = csv.DictWriter(self.csv_file, CSV_FIELDS)
        if new:
            self.csv.writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            self.tb = None

    def _reset_window(self) -> None:
        self.window = {"ce": 0.0, "ctc": 0.0, "n": 0, "audio_s": 0.0, "t0": time.time(), "tokens": 0}

    def elapsed(self) -> float:
        return round(time.time() - self.start, 1)

    def step(self, step: int, epoch: int, stats: dict) -> None:
        """One optimizer step's stats: the bar always, a CSV row every log_every steps."""
        w = self.window
        for k in ("ce", "ctc"):
            w[k] += stats[k] if stats["finite"] else 0.0
        w["n"] += int(stats["finite"])
        w["audio_s"] += stats["audio_s"]
        w["tokens"] += stats["tokens"]
        speed = w["audio_s"] / max(1e-9, time.time() - w["t0"])
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{stats['ce']:.3f}", lr=f"{stats['lr']:.2e}", audio_s_per_s=f"{speed:.1f}",
                             refresh=False)
        if step % self.log_every == 0:
            n = max(1, w["n"])
            self.row(step=step, epoch=epoch, lr=stats["lr"], train_loss=w["ce"] / n,
                     train_ctc=w["ctc"] / n if self.ctc else "", audio_sec_per_sec=round(speed, 2),
                     tokens=w["tokens"], elapsed_s=self.elapsed())
            self._reset_window()

    def evaluation(self, step: int, epoch: int, scores: dict, weights: str = "") -> None:
        """A dev row: of the raw weights, or with weights="ema" of their moving average."""
        prefix = f"{weights}_" if weights else ""
        self.row(step=step, epoch=epoch, **{f"{prefix}dev_wer": scores["wer"], f"{prefix}dev_cer": scores["cer"]},
                 elapsed_s=self.elapsed())
        ref, hyp = scores["examples"][0]
        tqdm.write(f"step {step}: {weights.upper() + ' ' if weights else ''}dev WER {100 * scores['wer']:.2f} %  "
                   f"CER {100 * scores['cer']:.2f} %  e.g. ref {ref!r} hyp {hyp!r}")

    def row(self, **values) -> None:
        if not self.enabled:
            return
        self.csv.writerow({k: values.get(k, "") for k in CSV_FIELDS})
        self.csv_file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, values["step"])

    def close(self) -> None:
        self.bar.close()
        if self.enabled:
            self.csv_file.close()
            if self.tb is not None:
                self.tb.close()
            plot_curves(self.csv_path, self.csv_path.with_name("curves.png"))


def keep_rows_up_to(csv_path: Path, step: int) -> float:
    """Drop the rows of steps after `step` (and a row torn by a kill) from metrics.csv, rewritten
    atomically, so a resumed run logs each step once; returns the last kept row's elapsed_s, so
    the resumed run's clock goes on from there."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    kept = [r for r in rows if None not in r.values() and None not in r and r["step"].isdigit()
            and int(r["step"]) <= step]
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in CSV_FIELDS} for r in kept)
    os.replace(tmp, csv_path)
    elapsed = [float(r["elapsed_s"]) for r in kept if r.get("elapsed_s")]
    return elapsed[-1] if elapsed else 0.0


def plot_curves(csv_path: Path, png_path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    train = [(int(r["step"]), float(r["train_loss"])) for r in rows if r["train_loss"]]
    dev = [(int(r["step"]), float(r["dev_wer"]), float(r["dev_cer"])) for r in rows if r["dev_cer"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        a.plot(*zip(*train), lw=1)
    a.set(xlabel="step", ylabel="train loss (per token)", title="training loss")
    if dev:
        steps, wer, cer = zip(*dev)
        b.plot(steps, [100 * w for w in wer], "o-", label="WER")
        b.plot(steps, [100 * c for c in cer], "s-", label="CER")
        b.legend()
    b.set(xlabel="step", ylabel="%", title="dev error rates (decoded with the --eval-* settings)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def opening(t) -> str:
    """What the run is about to do (t: the Trainer)."""
    o, d, tok = t.opts, t.model.dims, t.tokenizer
    batch = " and ".join(x for x in [f"≤ {o.max_batch_seconds:g} padded s" if o.max_batch_seconds else "",
                                     f"≤ {o.train_batch_size} clips" if o.train_batch_size else ""] if x)
    from .data import describe_splits
    lines = [
        "=" * 78,
        f"whisper_scratch training -> {t.out}" + ("  (resumed at step %d)" % t.state.step if o.resume else ""),
        f"data    {describe_splits(t.splits)}",
        f"        source {o.local_data_dir}",
        t.report.summary(),
        f"model   {o.whisper_size}: {t.model.num_parameters() / 1e6:.2f} M parameters (d {d.n_audio_state}, "
        f"{d.n_audio_layer}+{d.n_text_layer} layers, {d.n_audio_head} heads), {tok.kind} vocab {tok.vocab_size}"
        + (f", CTC weight {o.ctc_weight}" if o.ctc_weight else ""),
        f"device  {t.device} × {t.ddp.world}, dtype {o.dtype}, {torch.get_num_threads()} threads"
        + (", grad checkpointing" if o.grad_checkpointing else ""),
        f"batches {batch} × accum {o.grad_accum} × {t.ddp.world} rank(s); {t.steps_per_epoch} steps/epoch;"
        + (f" {o.time_budget:g} min budget (steps set after a warm-up)" if o.time_budget else f" {t.schedule_steps} steps")
        + (f" + {t.adapt_steps} padding-adaptation steps" if t.adapt_steps else "")
        + f"; lr {o.learning_rate:g}, warmup {o.warmup_steps}, {o.optimizer}",
        "=" * 78,
    ]
    return "\n".join(lines)


def closing(t, stopped_early: bool) -> str:
    """How the run ended and where its checkpoints are (t: the Trainer)."""
    st = t.state
    how = "stopped early" if stopped_early else "finished"
    best = f"best dev CER {100 * st.best_cer:.2f} %" if st.best_cer < float("inf") else "no evaluation yet"
    extra = f"; {st.nan_skipped} non-finite steps skipped" if st.nan_skipped else ""
    extra += f"; {st.data_errors} unreadable clips skipped" if st.data_errors else ""
    return (f"{how} at step {st.step}: {best}{extra}. Checkpoints: {t.out / 'last.pt'}"
            + (f", {t.out / 'best_model.pt'}" if (t.out / "best_model.pt").exists() else ""))
