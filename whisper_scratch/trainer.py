"""The training loop. Reads top to bottom: options -> devices -> data -> tokenizer -> model ->
optimizer -> resume -> loop (micro-steps, clip, step, evaluate, save) -> curves.

Loss: cross-entropy summed over the target tokens of every micro-batch of one optimizer step
(all ranks), divided by that step's token count — transcripts vary in length, so `loss / accum`
would weight short utterances more. With --ctc-weight w the loss is (1-w)·CE + w·CTC, both per
target token.
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data as D
from .augment import AugmentOptions
from .checkpoint import load_checkpoint
from .decoding import DecodingOptions, decode
from .metrics import error_rates
from .model import PRESETS, ModelDimensions, Whisper, preset_dims
from .tokenizer import TextNormalizer, build_tokenizer, tokenizer_from_dict

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _opt(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class TrainOptions:
    """Train a Whisper model from scratch (flags are this dataclass's fields)."""

    local_data_dir: Optional[str] = _opt(None, "Common Voice folder (corpus root or language folder) or a manifest (TSV/JSONL)")
    language: str = _opt("mn", "language code: the Common Voice subfolder and the <|lang|> token")
    train_split: str = _opt("train", "training split: train, or validated (= validated minus dev/test clips, sentences, speakers)")
    dev_split: str = _opt("dev", "split evaluated during training (greedy decoding, WER/CER)")
    output_dir: str = _opt("exp", "where checkpoints, metrics.csv and curves.png go")
    whisper_size: str = _opt("tiny", "model preset", choices=tuple(PRESETS))
    n_mels: int = _opt(80, "mel bins (80, or 128 as large-v3)", choices=(80, 128))
    tokenizer: str = _opt("char", "char (one token per character) or bpe (sentencepiece)", choices=("char", "bpe"))
    keep_chars: Optional[str] = _opt(None, "the char tokenizer's alphabet; other characters are counted and reported")
    bpe_vocab_size: int = _opt(256, "BPE vocabulary size")
    punctuation: str = _opt("strip", "text normalisation: strip or keep punctuation", choices=("strip", "keep"))
    lowercase: bool = _opt(True, "lower-case transcripts")
    train_batch_size: Optional[int] = _opt(None, "at most this many clips per batch (the seed's flag)")
    max_batch_seconds: Optional[float] = _opt(240.0, "padded-seconds budget per batch: clips × longest clip")
    eval_batch_size: int = _opt(16, "clips per batch when decoding the dev set")
    eval_beam_size: int = _opt(1, "beam size when decoding the dev set (1 = greedy)")
    eval_ctc_weight: float = _opt(0.0, "joint CTC prefix score weight when decoding the dev set (needs --ctc-weight > 0 and beam > 1)")
    max_eval_utts: Optional[int] = _opt(None, "decode at most this many dev clips per evaluation")
    num_epochs: int = _opt(10, "epochs (ignored when --max-steps is set)")
    max_steps: Optional[int] = _opt(None, "optimizer steps in all; sets the LR schedule's length")
    stop_after: Optional[int] = _opt(None, "stop after this step (saving last.pt) without changing the schedule")
    learning_rate: float = _opt(1e-3, "peak learning rate")
    min_lr_ratio: float = _opt(0.1, "cosine decay floor as a fraction of the peak")
    warmup_steps: int = _opt(500, "linear warmup steps")
    weight_decay: float = _opt(0.01, "AdamW weight decay, on weights with >= 2 dims only")
    grad_clip: float = _opt(1.0, "clip the global gradient norm (0 = off)")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    dtype: str = _opt("fp32", "fp16 (GPU, with GradScaler), bf16, or fp32", choices=tuple(DTYPES))
    grad_checkpointing: bool = _opt(False, "recompute activations in backward to save memory")
    optimizer: str = _opt("adamw", "adamw or adamw8bit (needs bitsandbytes)", choices=("adamw", "adamw8bit"))
    ctc_weight: float = _opt(0.0, "weight of the auxiliary CTC loss on the encoder (0 = no CTC head)")
    label_smoothing: float = _opt(0.0, "cross-entropy label smoothing")
    eval_every: int = _opt(500, "evaluate and save every N steps (and at the end)")
    log_every: int = _opt(10, "write a metrics.csv row every N steps")
    resume: bool = _opt(False, "continue from OUTPUT_DIR/last.pt exactly where it stopped")
    init_from: Optional[str] = _opt(None, "warm-start from an openai-whisper .pt ({dims, model_state_dict}): its encoder "
                                          "is copied, the decoder keeps our vocabulary and is trained anew")
    init_decoder: bool = _opt(False, "with --init-from, also copy the decoder (all but the token embedding)")
    seed: int = _opt(0, "random seed (init, batch order, augmentation)")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N")
    num_workers: int = _opt(2, "DataLoader worker processes decoding audio")
    feature_cache: Optional[str] = _opt(None, "folder for cached log-mels (fp16)")
    num_buckets: int = _opt(10, "duration buckets of the batch sampler")
    spec_augment: bool = _opt(False, "SpecAugment frequency and time masks")
    speed_perturb: bool = _opt(False, "speed perturbation 0.9 / 1.0 / 1.1")
    pad_to_30s_prob: float = _opt(0.0, "fraction of micro-batches padded to the full 30 s window with no mask, half "
                                       "with zero features (faster-whisper), half with silence (openai, HF): lets "
                                       "the exported model work in tools that always pad to 30 s; such a batch "
                                       "costs up to 30 s / clip length more")
    noise_dir: Optional[str] = _opt(None, "folder of noise clips mixed in at a random SNR")
    snr_low: float = _opt(5.0, "lowest SNR (dB) for --noise-dir")
    snr_high: float = _opt(20.0, "highest SNR (dB) for --noise-dir")
    max_nan_steps: int = _opt(20, "stop after this many consecutive non-finite steps")
    progress: bool = _opt(True, "show tqdm progress bars")

    def __post_init__(self):
        positive = ["eval_batch_size", "eval_beam_size", "num_epochs", "grad_accum", "eval_every", "log_every", "bpe_vocab_size",
                    "num_buckets", "max_nan_steps"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ["train_batch_size", "max_steps", "stop_after", "max_eval_utts"]:
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if self.max_batch_seconds is not None and self.max_batch_seconds < 30:
            raise ValueError(f"--max-batch-seconds must be >= 30 (one 30 s clip must fit), got {self.max_batch_seconds}")
        if self.max_batch_seconds is None and self.train_batch_size is None:
            raise ValueError("give --max-batch-seconds or --train-batch-size")
        for name, lo, hi in [("learning_rate", 0, 1), ("ctc_weight", 0, 1), ("label_smoothing", 0, 1),
                             ("min_lr_ratio", 0, 1), ("weight_decay", 0, 10)]:
            v = getattr(self, name)
            if not lo <= v <= hi or (name == "learning_rate" and v == 0) or (name == "ctc_weight" and v == 1):
                raise ValueError(f"--{name.replace('_', '-')} out of range, got {v}")
        if not 0 <= self.pad_to_30s_prob <= 1:
            raise ValueError(f"--pad-to-30s-prob must be in [0, 1], got {self.pad_to_30s_prob}")
        if not 0 <= self.eval_ctc_weight <= 1:
            raise ValueError(f"--eval-ctc-weight must be in [0, 1], got {self.eval_ctc_weight}")
        if self.eval_ctc_weight > 0 and self.ctc_weight == 0:
            raise ValueError("--eval-ctc-weight needs a CTC head: set --ctc-weight > 0")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.num_workers < 0:
            raise ValueError("--warmup-steps, --grad-clip and --num-workers must be >= 0")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; NCCL on GPUs, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return d


def resolve_device(opts: TrainOptions, ddp: Dist) -> torch.device:
    name = opts.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(f"error: --device {opts.device}: no CUDA GPU is available (use --device cpu)")
        if name == "cuda":
            name = f"cuda:{ddp.local_rank}"
        torch.cuda.set_device(name)
    device = torch.device(name)
    if opts.dtype == "fp16" and device.type != "cuda":
        raise SystemExit("error: --dtype fp16 needs a CUDA GPU; on the CPU use --dtype fp32 (or bf16)")
    if opts.dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SystemExit("error: --dtype bf16 is not supported by this GPU; use --dtype fp16")
    return device


def check_output_dir(opts: TrainOptions) -> Optional[Path]:
    """The checkpoint to resume from, or None; refuse to overwrite someone's run by accident."""
    out = Path(opts.output_dir)
    last = out / "last.pt"
    if opts.resume:
        if not last.is_file():
            raise SystemExit(f"error: --resume: no checkpoint at {last}")
        return last
    existing = [p.name for p in (out / "last.pt", out / "best_model.pt") if p.is_file()]
    if existing:
        raise SystemExit(f"error: {out} already holds a checkpoint ({', '.join(existing)}); pass --resume to "
                         f"continue it or choose another --output-dir")
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, numpy and torch RNG states as tensors/primitives (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
             "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Data, tokenizer, model, optimizer
# ---------------------------------------------------------------------------------------------
def load_data(opts: TrainOptions, report: D.DataReport) -> dict:
    if not opts.local_data_dir:
        raise SystemExit("error: give --local-data-dir (a Common Voice folder or a manifest); "
                         "./run.sh builds the synthetic Mongolian demo corpus when you give none")
    splits = {}
    for name in (opts.train_split, opts.dev_split):
        try:
            splits[name] = D.load_split(opts.local_data_dir, name, opts.language, report)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
    if not splits[opts.train_split]:
        raise SystemExit(f"error: the training split {opts.train_split!r} of {opts.local_data_dir} is empty "
                         f"(after skipping unusable clips)\n{report.summary()}")
    return splits


def make_tokenizer(opts: TrainOptions, texts: list, ckpt: Optional[dict]):
    if ckpt is not None:  # resume: the tokenizer the model was trained with, never a rebuilt one
        return tokenizer_from_dict(ckpt["tokenizer"])
    normalizer = TextNormalizer(lowercase=opts.lowercase, punctuation=opts.punctuation)
    return build_tokenizer(opts.tokenizer, texts, opts.keep_chars, opts.bpe_vocab_size, normalizer, (opts.language,))


def configure_optimizer(model: torch.nn.Module, opts: TrainOptions, device: torch.device):
    """AdamW; weight decay only on >= 2-D weights (not biases, LayerNorms or positional tables)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "positional" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if opts.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise SystemExit("error: --optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(groups, lr=opts.learning_rate, betas=(0.9, 0.98), eps=1e-8)
    return torch.optim.AdamW(groups, lr=opts.learning_rate, betas=(0.9, 0.98), eps=1e-8,
                             fused=device.type == "cuda")


def get_lr(step: int, opts: TrainOptions, total_steps: int) -> float:
    """Linear warmup to the peak, then cosine decay to min_lr_ratio × peak at total_steps."""
    if step < opts.warmup_steps:
        return opts.learning_rate * (step + 1) / opts.warmup_steps
    progress = min(1.0, (step - opts.warmup_steps) / max(1, total_steps - opts.warmup_steps))
    floor = opts.learning_rate * opts.min_lr_ratio
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (opts.learning_rate - floor)


class LossModule(torch.nn.Module):
    """Whisper + the training losses in one forward, so DDP sees every parameter it syncs."""

    def __init__(self, model: Whisper, pad_id: int, n_text: int, label_smoothing: float, ctc_weight: float):
        super().__init__()
        self.model = model
        self.pad_id, self.n_text = pad_id, n_text
        self.label_smoothing, self.ctc_weight = label_smoothing, ctc_weight

    def forward(self, mel, mel_lens, tokens_in, targets):
        """Summed losses (not averaged): CE over non-pad targets, and CTC if enabled."""
        xa = self.model.encoder(mel, mel_lens)
        xa_lens = self.model.encoder.output_lengths(mel_lens)
        logits = self.model.decoder(tokens_in, xa, xa_lens)
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=self.pad_id,
                             reduction="sum", label_smoothing=self.label_smoothing)
        if self.ctc_weight == 0:
            return ce, ce.new_zeros(())
        text = (targets >= 0) & (targets < self.n_text)  # text tokens only: no eot, no pad
        log_probs = self.model.ctc_logits(xa).log_softmax(-1).transpose(0, 1)  # (S, B, V)
        ctc = F.ctc_loss(log_probs, targets[text], xa_lens, text.sum(1), blank=self.pad_id,
                         reduction="sum", zero_infinity=True)
        return ce, ctc


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: Whisper, tokenizer, utts: list, opts: TrainOptions, device, amp_ctx) -> dict:
    """Real decoding of the dev clips (greedy unless --eval-beam-size; never teacher-forced), scored
    with jiwer."""
    if opts.max_eval_utts:
        utts = utts[: opts.max_eval_utts]
    if not utts:
        return {}
    was_training = model.training
    model.eval()
    dataset = D.AsrDataset(utts, tokenizer, model.dims.n_mels, cache_dir=opts.feature_cache)
    order = sorted(range(len(utts)), key=lambda i: utts[i].duration)
    refs, hyps = [], []
    collate = D.Collator(tokenizer)
    # an untrained model never emits <|endoftext|>: stop a little past the longest reference
    longest = max(len(t) for t in dataset.tokens) - len(dataset.prompt)
    options = DecodingOptions(language=opts.language, beam_size=opts.eval_beam_size, ctc_weight=opts.eval_ctc_weight,
                              max_new_tokens=min(model.dims.n_text_ctx // 2, int(1.25 * longest) + 8))
    for start in range(0, len(order), opts.eval_batch_size):
        batch = collate([dataset[i] for i in order[start:start + opts.eval_batch_size]])
        if batch["size"] == 0:
            continue
        with amp_ctx:
            results = decode(model, batch["mel"].to(device), batch["mel_lens"].to(device), tokenizer, options)
        refs += [tokenizer.normalize(utts[i].text) for i in batch["indices"]]
        hyps += [tokenizer.normalize(r.text) for r in results]
    model.train(was_training)
    scores = error_rates(refs, hyps)
    scores["examples"] = list(zip(refs[:3], hyps[:3]))
    return scores


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------
CSV_FIELDS = ["step", "epoch", "lr", "train_loss", "train_ctc", "dev_wer", "dev_cer", "audio_sec_per_sec",
              "tokens", "elapsed_s"]


class Logger:
    """metrics.csv (always), TensorBoard (when installed), curves.png at the end. Rank 0 only."""

    def __init__(self, out: Path, enabled: bool, resume: bool):
        self.enabled = enabled
        self.csv_path = out / "metrics.csv"
        self.tb = None
        if not enabled:
            return
        new = not (resume and self.csv_path.is_file())
        self.csv_file = open(self.csv_path, "w" if new else "a", newline="")
        self.csv = csv.DictWriter(self.csv_file, CSV_FIELDS)
        if new:
            self.csv.writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            self.tb = None

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
        if self.enabled:
            self.csv_file.close()
            if self.tb is not None:
                self.tb.close()
            plot_curves(self.csv_path, self.csv_path.with_name("curves.png"))


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
    b.set(xlabel="step", ylabel="%", title="dev error rates (greedy decoding)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batches_done: int = 0  # batches of `epoch` consumed by completed optimizer steps
    best_cer: float = float("inf")
    nan_streak: int = 0
    nan_skipped: int = 0
    data_errors: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class StopRequest:
    """First Ctrl-C: finish the current step, save, exit. Second Ctrl-C: stop at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading_main():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: saving a checkpoint after this step (press again to abort without saving)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


class Trainer:
    """Holds what the loop needs; methods are the loop's steps, in the order they run."""

    def __init__(self, opts: TrainOptions):
        self.opts = opts
        self.ddp = setup_distributed(opts.device if opts.device != "auto" else
                                     ("cuda" if torch.cuda.is_available() else "cpu"))
        self.device = resolve_device(opts, self.ddp)
        resume_path = check_output_dir(opts)
        self.out = Path(opts.output_dir)
        seed_everything(opts.seed)
        ckpt = load_checkpoint(resume_path) if resume_path else None
        self.report = D.DataReport()
        splits = load_data(opts, self.report)
        self.tokenizer = make_tokenizer(opts, [u.text for u in splits[opts.train_split]], ckpt)
        self.model = self._build_model(ckpt)
        self.train_utts = D.filter_for_model(splits[opts.train_split], self.tokenizer, self.model.dims.n_text_ctx,
                                             report=self.report)
        self.dev_utts = D.filter_for_model(splits[opts.dev_split], self.tokenizer, self.model.dims.n_text_ctx,
                                           report=self.report)
        self.splits = {opts.train_split: self.train_utts, opts.dev_split: self.dev_utts}
        if not self.train_utts:
            raise SystemExit(f"error: no usable training clips left\n{self.report.summary()}")
        self._build_batches()
        self._build_optimizer()
        self.state = TrainState()
        if ckpt is not None:
            self._restore(ckpt)
        self.amp = torch.autocast(self.device.type, dtype=DTYPES[opts.dtype], enabled=opts.dtype != "fp32")
        self.history: list = []

    # -- construction ---------------------------------------------------------------------------
    def _build_model(self, ckpt: Optional[dict]) -> Whisper:
        o = self.opts
        if ckpt is not None:
            old = ckpt.get("options", {})
            for name in ("whisper_size", "tokenizer", "n_mels"):
                if name in old and old[name] != getattr(o, name):
                    raise SystemExit(f"error: {self.out}/last.pt was trained with --{name.replace('_', '-')} "
                                     f"{old[name]}, not {getattr(o, name)}; resume with the same model flags")
            dims = ModelDimensions.from_dict(ckpt["dims"])
        else:
            dims = preset_dims(o.whisper_size, self.tokenizer.vocab_size, o.n_mels, ctc=o.ctc_weight > 0)
        model = Whisper(dims)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
        elif o.init_from:  # not on --resume: the checkpoint already holds the warm-started weights
            from .export import init_from_openai
            try:
                copied = init_from_openai(model, o.init_from, transfer_decoder=o.init_decoder)
            except (FileNotFoundError, ValueError) as e:
                raise SystemExit(f"error: --init-from: {e}") from None
            print(f"warm start: copied {len(copied)} tensors from {o.init_from}", flush=True)
        if o.ctc_weight > 0 and not dims.ctc:
            raise SystemExit("error: --ctc-weight > 0 but the checkpoint's model has no CTC head")
        model.set_grad_checkpointing(o.grad_checkpointing)
        return model.to(self.device)

    def _build_batches(self) -> None:
        o = self.opts
        self.sampler = D.DurationBucketSampler(
            [u.duration for u in self.train_utts], o.max_batch_seconds, o.train_batch_size, o.num_buckets,
            shuffle=True, seed=o.seed, rank=self.ddp.rank, world_size=self.ddp.world)
        augment = AugmentOptions(spec_augment=o.spec_augment, speed_perturb=o.speed_perturb, noise_dir=o.noise_dir,
                                 snr_range=(o.snr_low, o.snr_high))
        self.dataset = D.AsrDataset(self.train_utts, self.tokenizer, self.model.dims.n_mels, augment,
                                    o.feature_cache, seed=o.seed, language=o.language)
        self.steps_per_epoch = math.ceil(len(self.sampler) / o.grad_accum)
        self.total_steps = o.max_steps or o.num_epochs * self.steps_per_epoch

    def _build_optimizer(self) -> None:
        o = self.opts
        self.loss_module = LossModule(self.model, self.tokenizer.pad, self.tokenizer.n_text, o.label_smoothing,
                                      o.ctc_weight)
        self.wrapped = self.loss_module
        if self.ddp.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = torch.nn.parallel.DistributedDataParallel(self.loss_module, device_ids=ids)
        self.optimizer = configure_optimizer(self.model, o, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=o.dtype == "fp16")

    def _restore(self, ckpt: dict) -> None:
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(**ckpt["state"])
        self.sampler.load_state_dict(ckpt["sampler"])
        set_rng_state(ckpt["rng"])

    # -- saving ---------------------------------------------------------------------------------
    def save(self, name: str) -> None:
        if not self.ddp.main:
            return
        sampler_state = {"epoch": self.state.epoch, "batches_done": self.state.batches_done,
                         "seed": self.opts.seed, "world_size": self.ddp.world}
        from .checkpoint import save_checkpoint
        save_checkpoint(self.out / name, self.model, self.tokenizer, options=asdict(self.opts),
                        optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
                        sampler=sampler_state, state=self.state.to_dict(), rng=rng_state())

    # -- one optimizer step ---------------------------------------------------------------------
    def maybe_pad_to_window(self, batch: dict, index: int) -> dict:
        """With probability --pad-to-30s-prob, the batch as openai-whisper, HF and faster-whisper
        feed it: every clip padded to the encoder's full window, no mask. The padding is zero
        features (faster-whisper pads the log-mel) or the clip's silence floor, max - 2 (openai
        and HF pad the audio with zeros, which the log-mel clamps to max - 8 dB, i.e. max - 2
        after scaling). Seeded by (seed, step, micro-batch): exact resume still holds."""
        p = self.opts.pad_to_30s_prob
        if p == 0:
            return batch
        rng = np.random.default_rng([self.opts.seed, self.state.step, index, 30])
        if rng.random() >= p:
            return batch
        mel, lens = batch["mel"], batch["mel_lens"]
        full = torch.zeros(mel.shape[0], mel.shape[1], 2 * self.model.dims.n_audio_ctx)
        for b, n in enumerate(lens.tolist()):
            if rng.random() < 0.5:
                full[b] = float(mel[b, :, :n].max()) - 2.0
            full[b, :, :n] = mel[b, :, :n]
        return {**batch, "mel": full, "mel_lens": torch.full_like(lens, full.shape[-1]), "audio_frames": int(lens.sum())}

    def placeholder_batch(self) -> dict:
        """One second of silence with no targets, run with loss weight 0 (see run_epoch)."""
        prompt = list(self.tokenizer.sot_sequence(self.opts.language))
        return {"mel": torch.zeros(1, self.model.dims.n_mels, 100), "mel_lens": torch.tensor([100]),
                "tokens_in": torch.tensor([prompt]), "targets": torch.full((1, len(prompt)), self.tokenizer.pad),
                "size": 0, "placeholder": True}

    def step(self, micro: list) -> dict:
        o, pad = self.opts, self.tokenizer.pad
        lr = get_lr(self.state.step, o, self.total_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        n_tok = torch.tensor(float(sum(int((b["targets"] != pad).sum()) for b in micro)), device=self.device)
        if self.ddp.world > 1:
            dist.all_reduce(n_tok)
        n_tok = n_tok.clamp(min=1.0)  # a step of placeholders only (every rank's clips unreadable)
        sums = torch.zeros(2, device=self.device)
        for i, b in enumerate(micro):
            last = i == len(micro) - 1
            sync = contextlib.nullcontext() if self.ddp.world == 1 or last else self.wrapped.no_sync()
            with sync:
                with self.amp:
                    ce, ctc = self.wrapped(*(b[k].to(self.device, non_blocking=True)
                                             for k in ("mel", "mel_lens", "tokens_in", "targets")))
                # DDP averages gradients over ranks, so scale by world to get the global sum / tokens
                weight = 0.0 if b.get("placeholder") else self.ddp.world / n_tok
                loss = ((1 - o.ctc_weight) * ce + o.ctc_weight * ctc) * weight
                self.scaler.scale(loss).backward()
            if not b.get("placeholder"):
                sums += torch.stack([ce.detach().float(), ctc.detach().float()])
        self.scaler.unscale_(self.optimizer)
        params = self.model.parameters()
        gnorm = torch.nn.utils.clip_grad_norm_(params, o.grad_clip if o.grad_clip > 0 else float("inf"))
        if self.ddp.world > 1:
            dist.all_reduce(sums)
        finite = bool(torch.isfinite(gnorm)) and bool(torch.isfinite(sums).all())
        if o.dtype == "fp16":
            self.scaler.step(self.optimizer)  # skips the update itself on inf/NaN gradients
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        audio_s = sum(float(b.get("audio_frames", b["mel_lens"].sum())) for b in micro
                      if not b.get("placeholder")) / 100 * self.ddp.world
        return {"lr": lr, "ce": float(sums[0] / n_tok), "ctc": float(sums[1] / n_tok), "finite": finite,
                "audio_s": audio_s, "tokens": int(n_tok), "gnorm": float(gnorm)}

    def check_finite(self, stats: dict) -> None:
        """Count non-finite steps; many in a row means training diverged: save and stop."""
        if stats["finite"]:
            self.state.nan_streak = 0
            return
        self.state.nan_streak += 1
        self.state.nan_skipped += 1
        if self.state.nan_streak >= self.opts.max_nan_steps:
            self.save("last.pt")  # the weights are those before the bad steps: the last good state
            raise SystemExit(
                f"error: {self.state.nan_streak} consecutive steps had a non-finite loss or gradient (last loss "
                f"{stats['ce']}); saved the last good state to {self.out / 'last.pt'}. Lower --learning-rate, "
                f"raise --warmup-steps, or use --dtype bf16/fp32")

    def step_or_explain_oom(self, micro: list) -> dict:
        try:
            return self.step(micro)
        except torch.cuda.OutOfMemoryError:
            padded = sum(int(b["mel_lens"].numel()) * int(b["mel_lens"].max()) for b in micro) / 100
            raise SystemExit(
                f"error: CUDA out of memory on a step of {len(micro)} micro-batch(es), the largest "
                f"{max(int(b['mel_lens'].numel()) * int(b['mel_lens'].max()) for b in micro) / 100:.0f} padded s "
                f"({padded:.0f} padded s in all). Lower --max-batch-seconds (now {self.opts.max_batch_seconds}) "
                f"or --train-batch-size and raise --grad-accum, or add --grad-checkpointing / --dtype fp16") from None

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> dict:
        o, st = self.opts, self.state
        if self.ddp.main:
            self.out.mkdir(parents=True, exist_ok=True)
            print(self.summary(), flush=True)
        logger = Logger(self.out, self.ddp.main, o.resume)
        bar = tqdm(total=self.total_steps, initial=st.step, disable=not (o.progress and self.ddp.main),
                   unit="step", dynamic_ncols=True, mininterval=1.0)
        window = {"ce": 0.0, "ctc": 0.0, "n": 0, "audio_s": 0.0, "t0": time.time(), "tokens": 0}
        start_time, self.last_eval, self.last_eval_step = time.time(), {}, -1
        stop = StopRequest()
        with stop:
            while st.step < self.total_steps and not stop.requested:
                if self.run_epoch(stop, bar, window, logger, start_time):
                    break
        bar.close()
        stopped_early = st.step < self.total_steps
        if not stopped_early and st.step > 0 and self.last_eval_step != st.step:
            self.evaluate_and_save(logger, start_time)
        elif stopped_early or st.step == 0:
            self.save("last.pt")
        logger.close()
        if self.ddp.main:
            print(self.closing(stopped_early), flush=True)
        return {"step": st.step, "best_cer": st.best_cer, "last_eval": self.last_eval, "history": self.history,
                "nan_skipped": st.nan_skipped, "data_errors": st.data_errors}

    def run_epoch(self, stop, bar, window, logger, start_time) -> bool:
        """One pass over this epoch's remaining batches; True when training should end."""
        o, st = self.opts, self.state
        self.sampler.set_epoch(st.epoch)
        self.dataset.set_epoch(st.epoch)
        consumed, micro = st.batches_done, []
        for batch in D.make_loader(self.dataset, self.sampler, o.num_workers):
            consumed += 1
            for err in batch["errors"]:
                st.data_errors += 1
                tqdm.write(f"skipped unreadable clip: {err}", file=sys.stderr)
            if batch["size"]:
                micro.append(self.maybe_pad_to_window(batch, len(micro)))
            elif self.ddp.world > 1:
                # every clip of this batch was unreadable on this rank alone: the others still run a
                # forward/backward for it, so this rank must too or the gradient all-reduce hangs
                micro.append(self.placeholder_batch())
            if len(micro) < o.grad_accum:
                continue
            self.after_step(self.step_or_explain_oom(micro), consumed, bar, window, logger, start_time)
            micro = []
            if st.step >= self.total_steps or stop.requested or (o.stop_after and st.step >= o.stop_after):
                return True
        if micro:  # the epoch's last, partial accumulation
            self.after_step(self.step_or_explain_oom(micro), consumed, bar, window, logger, start_time)
        st.epoch, st.batches_done = st.epoch + 1, 0
        return bool(o.stop_after and st.step >= o.stop_after)

    def after_step(self, stats, consumed, bar, window, logger, start_time) -> None:
        o, st = self.opts, self.state
        self.check_finite(stats)
        st.step += 1
        st.batches_done = consumed
        self.history.append((st.step, stats["ce"], stats["ctc"]))
        for k in ("ce", "ctc"):
            window[k] += stats[k] if stats["finite"] else 0.0
        window["n"] += int(stats["finite"])
        window["audio_s"] += stats["audio_s"]
        window["tokens"] += stats["tokens"]
        speed = window["audio_s"] / max(1e-9, time.time() - window["t0"])
        bar.update(1)
        bar.set_postfix(loss=f"{stats['ce']:.3f}", lr=f"{stats['lr']:.2e}", audio_s_per_s=f"{speed:.1f}",
                        refresh=False)
        if st.step % o.log_every == 0:
            n = max(1, window["n"])
            logger.row(step=st.step, epoch=st.epoch, lr=stats["lr"], train_loss=window["ce"] / n,
                       train_ctc=window["ctc"] / n if o.ctc_weight else "", audio_sec_per_sec=round(speed, 2),
                       tokens=window["tokens"], elapsed_s=round(time.time() - start_time, 1))
            window.update(ce=0.0, ctc=0.0, n=0, audio_s=0.0, t0=time.time(), tokens=0)
        if st.step % o.eval_every == 0 or st.step == self.total_steps:
            self.evaluate_and_save(logger, start_time)

    def evaluate_and_save(self, logger, start_time) -> None:
        st = self.state
        self.last_eval_step = st.step  # on every rank: they must agree on when to meet at the barrier
        if self.ddp.main:
            scores = evaluate(self.model, self.tokenizer, self.dev_utts, self.opts, self.device, self.amp)
            self.last_eval = {"step": st.step, **scores}
            if scores:
                logger.row(step=st.step, epoch=st.epoch, dev_wer=scores["wer"], dev_cer=scores["cer"],
                           elapsed_s=round(time.time() - start_time, 1))
                tqdm.write(f"step {st.step}: dev WER {100 * scores['wer']:.2f} %  CER {100 * scores['cer']:.2f} %"
                           f"  e.g. ref {scores['examples'][0][0]!r} hyp {scores['examples'][0][1]!r}")
                if scores["cer"] < st.best_cer:
                    st.best_cer = scores["cer"]
                    self.save("best_model.pt")
            self.save("last.pt")
        if self.ddp.world > 1:
            dist.barrier()

    # -- what the user reads ----------------------------------------------------------------------
    def summary(self) -> str:
        o, d, tok = self.opts, self.model.dims, self.tokenizer
        batch = " and ".join(x for x in [f"≤ {o.max_batch_seconds:g} padded s" if o.max_batch_seconds else "",
                                         f"≤ {o.train_batch_size} clips" if o.train_batch_size else ""] if x)
        lines = [
            "=" * 78,
            f"whisper_scratch training -> {self.out}" + ("  (resumed at step %d)" % self.state.step if o.resume else ""),
            f"data    {D.describe_splits(self.splits)}",
            f"        source {o.local_data_dir}",
            self.report.summary(),
            f"model   {o.whisper_size}: {self.model.num_parameters() / 1e6:.2f} M parameters (d {d.n_audio_state}, "
            f"{d.n_audio_layer}+{d.n_text_layer} layers, {d.n_audio_head} heads), {tok.kind} vocab {tok.vocab_size}"
            + (f", CTC weight {o.ctc_weight}" if o.ctc_weight else ""),
            f"device  {self.device} × {self.ddp.world}, dtype {o.dtype}, {torch.get_num_threads()} threads"
            + (", grad checkpointing" if o.grad_checkpointing else ""),
            f"batches {batch} × accum {o.grad_accum} × {self.ddp.world} rank(s); {self.steps_per_epoch} steps/epoch;"
            f" {self.total_steps} steps; lr {o.learning_rate:g}, warmup {o.warmup_steps}, {o.optimizer}",
            "=" * 78,
        ]
        return "\n".join(lines)

    def closing(self, stopped_early: bool) -> str:
        st = self.state
        how = "stopped early" if stopped_early else "finished"
        best = f"best dev CER {100 * st.best_cer:.2f} %" if st.best_cer < float("inf") else "no evaluation yet"
        extra = f"; {st.nan_skipped} non-finite steps skipped" if st.nan_skipped else ""
        extra += f"; {st.data_errors} unreadable clips skipped" if st.data_errors else ""
        return (f"{how} at step {st.step}: {best}{extra}. Checkpoints: {self.out / 'last.pt'}"
                + (f", {self.out / 'best_model.pt'}" if (self.out / "best_model.pt").exists() else ""))


def train(opts: TrainOptions) -> dict:
    """Build everything from `opts`, train, and return a summary (the loss history included)."""
    trainer = Trainer(opts)
    try:
        return trainer.run()
    finally:
        if trainer.ddp.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
