"""The training loop: TrainOptions (every train.py flag) -> data, tokenizer, model, optimizer ->
micro-batches -> one optimizer step -> log -> evaluate and save. `Trainer.run` is the whole loop
in one screen, in nanoGPT's order; the pieces it calls (`step`, `maybe_pad_to_window`) are methods
tests call directly.

Loss: cross-entropy summed over the target tokens of every micro-batch of one optimizer step
(all ranks), divided by that step's token count — transcripts vary in length, so `loss / accum`
would weight short utterances more. With --ctc-weight w the loss is (1-w)·CE + w·CTC, both per
target token.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data as D
from .audio import FRAMES_PER_SECOND
from .augment import LIMITS as AUGMENT_LIMITS, PAD_FILLS, AugmentOptions, check_limits
from .average import Ema, prune_snapshots, snapshot_name
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import DTYPE_ALIASES, canonical_dtype, flag, option
from .decoding import DecodingOptions, with_language_model
from .evaluation import evaluate
from .model import FEATURE_NORMS, PRESETS, ModelDimensions, Whisper, preset_dims
from .tokenizer import TextNormalizer, build_tokenizer, tokenizer_from_dict
from .training_log import TrainLog, closing, opening

SHORT_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
# AdamW's beta2 = 0.98, not 0.999: the usual choice for transformers trained from scratch (fairseq,
# ESPnet); the second-moment estimate adapts faster to the large early gradient changes.
ADAM_BETAS = (0.9, 0.98)
# zero features are the harder padding (a flat band well above the silence floor): after 150
# adaptation steps half and half, the demo model's CER on zero-padded input was 1.32x its own,
# on floor-padded 0.98x (bench/deploy_accuracy.py)
ZERO_FILL_SHARE = 2 / 3
PAD_SALT = 30  # separates the --pad-to-30s-prob stream from other streams seeded by (seed, step)
# --time-budget: steps 0-2 carry one-off costs (allocator, worker start-up) and are not timed; the
# next 20 are. An adaptation step costs 1.8 plain ones (bench/pad_adapt_cost.py, CPU demo).
BUDGET_SKIP, BUDGET_MEASURE, ADAPT_STEP_COST = 3, 20, 1.8


@dataclass(frozen=True)
class TrainOptions:
    """Train a Whisper model from scratch (flags are this dataclass's fields)."""

    local_data_dir: Optional[str] = option(None, "Common Voice folder (corpus root or language folder) or a manifest (TSV/JSONL)")
    language: str = option("mn", "language code: the Common Voice subfolder and the <|lang|> token")
    train_split: str = option("train", "training split: train, or validated (= validated minus dev/test clips, sentences, speakers)")
    dev_split: str = option("dev", "split evaluated during training (decoded with the --eval-* settings, WER/CER)")
    carve_dev: float = option(D.CARVE[0], "fraction of validated.tsv carved out as dev (speaker- and sentence-disjoint, "
                                          "by SHA-256 of client_id) when a Common Voice folder has no train/dev/test.tsv")
    carve_test: float = option(D.CARVE[1], "the same for test (held out: never trained on nor evaluated during training)")
    output_dir: str = option("exp", "where checkpoints, metrics.csv and curves.png go")
    whisper_size: str = option("tiny", "model preset", choices=tuple(PRESETS))
    n_mels: int = option(80, "mel bins (80, or 128 as large-v3)", choices=(80, 128))
    feature_norm: str = option("none", "normalise each utterance's log-mels per mel bin in the encoder: mean, or "
                                       "meanvar (also the variance); removes the microphone and the voice's average "
                                       "spectrum (few training speakers); such a model cannot be exported to the 30 s "
                                       "tools", choices=FEATURE_NORMS)
    tokenizer: str = option("char", "char (one token per character) or bpe (sentencepiece)", choices=("char", "bpe"))
    keep_chars: Optional[str] = option(None, "the char tokenizer's alphabet; other characters are counted and reported")
    bpe_vocab_size: int = option(256, "BPE vocabulary size")
    punctuation: str = option("strip", "text normalisation: strip or keep punctuation", choices=("strip", "keep"))
    lowercase: bool = option(True, "lower-case transcripts")
    train_batch_size: Optional[int] = option(None, "at most this many clips per batch (the seed's flag)")
    max_batch_seconds: Optional[float] = option(240.0, "padded-seconds budget per batch: clips × longest clip")
    eval_batch_size: int = option(16, "clips per batch when decoding the dev set")
    eval_beam_size: int = option(1, "beam size when decoding the dev set (1 = greedy)")
    eval_ctc_weight: float = option(0.0, "joint CTC prefix score weight when decoding the dev set (needs --ctc-weight > 0; "
                                            "> 0 decodes with beam search, even at --eval-beam-size 1)")
    max_eval_utts: Optional[int] = option(None, "decode at most this many dev clips per evaluation")
    eval_lm_path: Optional[str] = option(None, "a character language model (python -m whisper_scratch.lm) fused into "
                                               "the dev decoding with --eval-lm-weight")
    eval_lm_weight: float = option(0.0, "language model weight in the dev decoding (needs --eval-lm-path)")
    eval_length_bonus: float = option(0.0, "per-token bonus in the dev decoding's beam search")
    keep_checkpoints: int = option(5, "weights-only snapshots step-N.pt (with their dev scores) kept from the last "
                                      "evaluations, for `python -m whisper_scratch.average`; 0 = none")
    ema_decay: float = option(0.0, "also keep an exponential moving average of the weights (e.g. 0.995), evaluated "
                                   "beside the raw weights and saved as ema.pt and best_ema.pt; 0 = off")
    time_budget: Optional[float] = option(None, "minutes for the whole run: after a measured warm-up the schedule's "
                                                "length is set so that the cosine decay, the padding adaptation and "
                                                "the last evaluation end on time (replaces --max-steps)")
    pad_adapt_fraction: Optional[float] = option(None, "with --time-budget: the --pad-adapt-steps as this fraction of "
                                                       "the steps the budget allows (e.g. 0.25)")
    num_epochs: int = option(10, "epochs (ignored when --max-steps is set)")
    max_steps: Optional[int] = option(None, "optimizer steps in all; sets the LR schedule's length")
    stop_after: Optional[int] = option(None, "stop after this step (saving last.pt) without changing the schedule")
    learning_rate: float = option(1e-3, "peak learning rate")
    min_lr_ratio: float = option(0.1, "cosine decay floor as a fraction of the peak")
    warmup_steps: int = option(500, "linear warmup steps")
    weight_decay: float = option(0.01, "AdamW weight decay, on weights with >= 2 dims only")
    grad_clip: float = option(1.0, "clip the global gradient norm (0 = off)")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    dtype: str = option("fp32", "fp16 (GPU, with GradScaler), bf16, or fp32 (float16, bfloat16, float32 "
                                     "also accepted)", choices=tuple(DTYPE_ALIASES))
    grad_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    optimizer: str = option("adamw", "adamw or adamw8bit (needs bitsandbytes)", choices=("adamw", "adamw8bit"))
    ctc_weight: float = option(0.0, "weight of the auxiliary CTC loss on the encoder (0 = no CTC head)")
    label_smoothing: float = option(0.0, "cross-entropy label smoothing")
    dropout: float = option(0.0, "dropout on every residual branch while training (0 = none, as openai-whisper; "
                                 "a regulariser for small corpora; not saved with the weights)")
    eval_every: int = option(500, "evaluate and save every N steps (and at the end)")
    log_every: int = option(10, "write a metrics.csv row every N steps")
    resume: bool = option(False, "continue from OUTPUT_DIR/last.pt exactly where it stopped")
    init_from: Optional[str] = option(None, "warm-start from an openai-whisper .pt or one of our checkpoints (e.g. a "
                                          "model pretrained on more voices): its encoder is copied, the decoder keeps "
                                          "this run's vocabulary and is trained anew")
    init_decoder: bool = option(False, "with --init-from, also copy the decoder (all but the token embedding); from one of "
                                       "our checkpoints: the whole model and its tokenizer (fine-tuning on new data)")
    seed: int = option(0, "random seed (init, batch order, augmentation)")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    num_workers: int = option(2, "DataLoader worker processes decoding audio")
    feature_cache: Optional[str] = option(None, "folder for cached log-mels (fp16)")
    num_buckets: int = option(10, "duration buckets of the batch sampler")
    spec_augment: bool = option(False, "SpecAugment frequency and time masks")
    speed_perturb: bool = option(False, "speed perturbation: each clip played at 1 - x, 1 or 1 + x its speed "
                                        "(x = --speed-perturb-max)")
    speed_perturb_max: float = option(0.1, "largest speed change of --speed-perturb: 0.1 is Kaldi's 0.9 / 1.0 / 1.1; "
                                           "0.2 also varies pitch like a new voice (tempo and pitch move together)")
    vtlp_max: float = option(0.0, "vocal tract length perturbation: each clip's spectrum stretched along frequency "
                                  "by a factor from [1 - x, 1 + x] (formants of a shorter or longer vocal tract); "
                                  "0 = off, 0.1 is Jaitly & Hinton's range")
    channel_db: float = option(0.0, "a random smooth gain over frequency of up to this many dB per clip (another "
                                    "microphone); 0 = off")
    gain_db: float = option(0.0, "each clip made up to this many dB louder or softer (the log-mel keeps the "
                                 "recording level); 0 = off")
    silence_pad_max: float = option(0.0, "a share of the clips (--silence-pad-prob) get up to this many seconds of "
                                         "silence before and after (each drawn on its own): for corpora cut tight to "
                                         "the speech, so the model reads nothing into the silence a VAD chunk starts "
                                         "with, and hears a word wherever it starts")
    silence_pad_prob: float = option(0.5, "the share of clips --silence-pad-max pads")
    silence_pad_fill: str = option("zeros", "what --silence-pad-max pads with: zeros (digital silence, as synthetic "
                                            "speech has) or background (the clip's own quietest frames: real "
                                            "recordings, e.g. FSDD's tightly cut digits)")
    pad_to_30s_prob: float = option(0.0, "fraction of micro-batches of which a share (as many clips as fit in the "
                                       "batch's frames) is padded to the full 30 s window with no mask, 2/3 with "
                                       "zero features (faster-whisper, openai transcribe), 1/3 with silence (HF, "
                                       "whisper.cpp): lets the exported model work in tools that always pad to 30 s")
    pad_adapt_steps: int = option(0, "after the learning-rate schedule, this many more steps at its final rate in "
                                     "which every micro-batch has a padded share (as --pad-to-30s-prob 1): adapts "
                                     "the model to the 30 s tools; best_model.pt is then chosen among these steps")
    noise_dir: Optional[str] = option(None, "folder of noise clips mixed in at a random SNR")
    snr_low: float = option(5.0, "lowest SNR (dB) for --noise-dir")
    snr_high: float = option(20.0, "highest SNR (dB) for --noise-dir")
    max_nan_steps: int = option(20, "stop after this many consecutive non-finite steps")
    progress: bool = option(True, "show tqdm progress bars")

    def __post_init__(self):
        positive = ["eval_batch_size", "eval_beam_size", "num_epochs", "grad_accum", "eval_every", "log_every", "bpe_vocab_size",
                    "num_buckets", "max_nan_steps"]
        if self.time_budget is not None:
            if not (math.isfinite(self.time_budget) and self.time_budget > 0):
                raise ValueError(f"--time-budget must be a finite number > 0 of minutes, got {self.time_budget}")
            if self.max_steps is not None:
                raise ValueError(f"--time-budget {self.time_budget} sets the schedule's length; it cannot be used "
                                 f"with --max-steps {self.max_steps}")
        if not 0 < self.speed_perturb_max < 1:
            raise ValueError(f"--speed-perturb-max must be in (0, 1), got {self.speed_perturb_max}")
        check_limits({field: getattr(self, field) for field in AUGMENT_LIMITS}, lambda f: "--" + f.replace("_", "-"))
        if self.pad_adapt_fraction is not None:
            if self.time_budget is None or not 0 <= self.pad_adapt_fraction < 1:
                raise ValueError(f"--pad-adapt-fraction {self.pad_adapt_fraction} must be in [0, 1) and needs "
                                 f"--time-budget")
            if self.pad_adapt_steps:
                raise ValueError(f"give --pad-adapt-steps {self.pad_adapt_steps} or --pad-adapt-fraction "
                                 f"{self.pad_adapt_fraction}, not both")
        if self.eval_lm_weight and not self.eval_lm_path:
            raise ValueError(f"--eval-lm-weight {self.eval_lm_weight} needs --eval-lm-path")
        if self.ema_decay and not 0 < self.ema_decay < 1:
            raise ValueError(f"--ema-decay must be in (0, 1) or 0 (off), got {self.ema_decay}")
        if self.keep_checkpoints < 0:
            raise ValueError(f"--keep-checkpoints must be >= 0, got {self.keep_checkpoints}")
        if self.pad_adapt_steps < 0:
            raise ValueError(f"--pad-adapt-steps must be >= 0, got {self.pad_adapt_steps}")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ["train_batch_size", "max_steps", "stop_after", "max_eval_utts"]:
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{flag(name)} must be >= 1, got {v}")
        if self.max_batch_seconds is not None and not (math.isfinite(self.max_batch_seconds)
                                                       and self.max_batch_seconds >= 30):
            raise ValueError(f"--max-batch-seconds must be a finite number >= 30 (one 30 s clip must fit), got "
                             f"{self.max_batch_seconds}")
        if self.max_batch_seconds is None and self.train_batch_size is None:
            raise ValueError("give --max-batch-seconds or --train-batch-size")
        for name, lo, hi in [("learning_rate", 0, 1), ("ctc_weight", 0, 1), ("label_smoothing", 0, 1),
                             ("min_lr_ratio", 0, 1), ("weight_decay", 0, 10), ("dropout", 0, 1)]:
            v = getattr(self, name)
            if not lo <= v <= hi or (name == "learning_rate" and v == 0) or (name in ("ctc_weight", "dropout") and v == 1):
                raise ValueError(f"{flag(name)} out of range, got {v}")
        if not 0 <= self.pad_to_30s_prob <= 1:
            raise ValueError(f"--pad-to-30s-prob must be in [0, 1], got {self.pad_to_30s_prob}")
        if not 0 <= self.eval_ctc_weight <= 1:
            raise ValueError(f"--eval-ctc-weight must be in [0, 1], got {self.eval_ctc_weight}")
        if self.eval_ctc_weight > 0 and self.ctc_weight == 0:
            raise ValueError("--eval-ctc-weight needs a CTC head: set --ctc-weight > 0")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.num_workers < 0:
            raise ValueError("--warmup-steps, --grad-clip and --num-workers must be >= 0")
        if self.init_decoder and not self.init_from:
            raise ValueError("--init-decoder copies the decoder of --init-from's checkpoint: give --init-from too")
        if self.silence_pad_fill not in PAD_FILLS:
            raise ValueError(f"--silence-pad-fill must be {' or '.join(PAD_FILLS)}, got {self.silence_pad_fill!r}")
        if self.pad_to_30s_prob > 0 and self.feature_norm != "none":
            raise ValueError(f"--pad-to-30s-prob {self.pad_to_30s_prob} trains for export to the 30 s tools; a model with "
                             f"--feature-norm {self.feature_norm} cannot be exported to them")
        if self.keep_chars is not None and self.tokenizer == "bpe":
            raise ValueError(f"--keep-chars {self.keep_chars!r} sets the char tokenizer's alphabet; it cannot be "
                             f"used with --tokenizer bpe")
        # one spelling: fp16 / float16 are the same run (the short names are what the checkpoint records)
        object.__setattr__(self, "dtype", SHORT_DTYPE[canonical_dtype(self.dtype)])
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


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


# flags that change how a run is carried out, not what it learns: no note when they differ on resume
RESUME_SAME = {"resume", "stop_after", "progress", "num_workers", "log_every", "max_nan_steps", "feature_cache",
               "eval_batch_size"}
RESUME_PATHS = {"output_dir", "local_data_dir", "init_from", "noise_dir", "eval_lm_path"}
TOKENIZER_FLAGS = {"keep_chars", "lowercase", "punctuation", "bpe_vocab_size"}  # the checkpoint's tokenizer is kept


def resume_changes(old: dict, opts: TrainOptions, budget_fitted: bool) -> str:
    """A note naming every flag that differs from the resumed run's (taking effect from here on,
    or ignored on resume), or "" when none does: a resume continues the run it is given flags for,
    so a changed --learning-rate or --max-steps reshapes the rest of the schedule."""
    ignored = {"init_from", "init_decoder"} | TOKENIZER_FLAGS
    if budget_fitted:
        ignored |= {"time_budget", "max_steps", "pad_adapt_fraction", "pad_adapt_steps"}

    def same(k) -> bool:
        a, b = old[k], getattr(opts, k)
        if k in RESUME_PATHS and a and b:
            return Path(a).resolve() == Path(b).resolve()  # exp/run/ and /abs/exp/run are one folder
        return a == b

    changed = [f"{flag(k)} {getattr(opts, k)} (was {old[k]}{'; ignored on resume' if k in ignored else ''})"
               for k in sorted(old) if k not in RESUME_SAME and hasattr(opts, k) and not same(k)]
    return f"note: --resume with flags that differ from the run's: {', '.join(changed)}" if changed else ""


def check_output_dir(opts: TrainOptions) -> Optional[Path]:
    """The checkpoint to resume from, or None; refuse to overwrite someone's run by accident."""
    out = Path(opts.output_dir)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --output-dir {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # fail now, not after loading the data
        raise SystemExit(f"error: --output-dir {out}: cannot create it ({e.strerror})") from None
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


def load_data(opts: TrainOptions, report: D.DataReport) -> dict:
    if not opts.local_data_dir:
        raise SystemExit("error: give --local-data-dir (a Common Voice folder or a manifest); "
                         "./run.sh builds the synthetic Mongolian demo corpus when you give none")
    splits = {}
    for name in (opts.train_split, opts.dev_split):
        try:
            splits[name] = D.load_split(opts.local_data_dir, name, opts.language, report,
                                        (opts.carve_dev, opts.carve_test))
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
    if not splits[opts.train_split]:
        raise SystemExit(f"error: the training split {opts.train_split!r} of {opts.local_data_dir} is empty "
                         f"(after skipping unusable clips)\n{report.summary()}")
    return splits


def usable_splits(opts: TrainOptions, splits: dict, tokenizer, n_text_ctx: int, report: D.DataReport) -> dict:
    """The train and dev clips the model can learn from (text fits the context; counted skips)."""
    kept = {name: D.filter_for_model(splits[name], tokenizer, n_text_ctx, report=report)
            for name in (opts.train_split, opts.dev_split)}
    if not kept[opts.train_split]:
        raise SystemExit(f"error: no usable training clips left\n{report.summary()}")
    return kept


def read_init_source(opts: TrainOptions, ckpt: Optional[dict]) -> Optional[tuple]:
    """--init-from's checkpoint, read once for the tokenizer and the weights (warmstart.read_source);
    None without it or on --resume (the resumed checkpoint already holds the warm-started weights)."""
    if ckpt is not None or not opts.init_from:
        return None
    from .warmstart import read_source
    try:
        return read_source(opts.init_from)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: --init-from: {e}") from None


def make_tokenizer(opts: TrainOptions, texts: list, ckpt: Optional[dict], source: Optional[tuple] = None):
    if ckpt is not None:  # resume: the tokenizer the model was trained with, never a rebuilt one
        return tokenizer_from_dict(ckpt["tokenizer"])
    if source is not None and opts.init_decoder:  # fine-tuning one of ours: its decoder speaks its vocabulary
        theirs = source[3]
        if theirs is not None:
            if opts.keep_chars is not None or opts.tokenizer != theirs["kind"]:
                raise SystemExit(f"error: --init-decoder fine-tunes {opts.init_from} with its own {theirs['kind']} "
                                 f"tokenizer; drop --keep-chars and use --tokenizer {theirs['kind']}")
            print(f"tokenizer: {opts.init_from}'s ({theirs['kind']}), kept for fine-tuning", flush=True)
            return tokenizer_from_dict(theirs)
    normalizer = TextNormalizer(lowercase=opts.lowercase, punctuation=opts.punctuation)
    return build_tokenizer(opts.tokenizer, texts, opts.keep_chars, opts.bpe_vocab_size, normalizer, (opts.language,))


def build_model(opts: TrainOptions, tokenizer, ckpt: Optional[dict], device: torch.device,
                source: Optional[tuple] = None) -> Whisper:
    """The preset's model, the resumed checkpoint's, or a warm start from another checkpoint."""
    if ckpt is not None:
        old = ckpt.get("options", {})
        for name in ("whisper_size", "tokenizer", "n_mels", "feature_norm"):
            if name in old and old[name] != getattr(opts, name):
                raise SystemExit(f"error: {opts.output_dir}/last.pt was trained with {flag(name)} "
                                 f"{old[name]}, not {getattr(opts, name)}; resume with the same model flags")
        dims = ModelDimensions.from_dict(ckpt["dims"])
    else:
        dims = preset_dims(opts.whisper_size, tokenizer.vocab_size, opts.n_mels, ctc=opts.ctc_weight > 0,
                           feature_norm=opts.feature_norm)
    model = Whisper(dims)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    elif opts.init_from:  # not on --resume: the checkpoint already holds the warm-started weights
        from .warmstart import warm_start
        try:
            copied = warm_start(model, opts.init_from, opts.init_decoder, tokenizer.to_dict(), source)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: --init-from: {e}") from None
        print(f"warm start: copied {len(copied)} tensors from {opts.init_from}", flush=True)
    if opts.ctc_weight > 0 and not dims.ctc:
        raise SystemExit("error: --ctc-weight > 0 but the checkpoint's model has no CTC head")
    model.set_grad_checkpointing(opts.grad_checkpointing)
    model.set_dropout(opts.dropout)
    return model.to(device)


def build_batches(opts: TrainOptions, utts: list, tokenizer, n_mels: int, ddp: Dist) -> tuple:
    """The duration-bucketed sampler (this rank's share) and the augmenting dataset."""
    o = opts
    sampler = D.DurationBucketSampler([u.duration for u in utts], o.max_batch_seconds, o.train_batch_size,
                                      o.num_buckets, shuffle=True, seed=o.seed, rank=ddp.rank, world_size=ddp.world)
    x = o.speed_perturb_max
    augment = AugmentOptions(spec_augment=o.spec_augment, speed_perturb=o.speed_perturb, speeds=(1 - x, 1.0, 1 + x),
                             noise_dir=o.noise_dir, snr_range=(o.snr_low, o.snr_high), silence_pad_max=o.silence_pad_max,
                             silence_pad_prob=o.silence_pad_prob, silence_pad_fill=o.silence_pad_fill,
                             vtlp_max=o.vtlp_max, channel_db=o.channel_db, gain_db=o.gain_db,
                             mask_fill="mean" if o.feature_norm == "none" else "bin_mean")
    try:
        dataset = D.AsrDataset(utts, tokenizer, n_mels, augment, o.feature_cache, seed=o.seed, language=o.language)
    except (FileNotFoundError, ValueError) as e:  # --noise-dir: missing, empty, or holding files that are not audio
        raise SystemExit(f"error: {e}") from None
    return sampler, dataset


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
        return bnb.optim.AdamW8bit(groups, lr=opts.learning_rate, betas=ADAM_BETAS, eps=1e-8)
    return torch.optim.AdamW(groups, lr=opts.learning_rate, betas=ADAM_BETAS, eps=1e-8,
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
        """(loss, ce, ctc), each summed over the batch's target tokens (not averaged):
        loss = (1 - ctc_weight)·ce + ctc_weight·ctc; ctc is 0 without a CTC weight."""
        xa = self.model.encoder(mel, mel_lens)
        xa_lens = self.model.encoder.output_lengths(mel_lens)
        logits = self.model.decoder(tokens_in, xa, xa_lens)
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=self.pad_id,
                             reduction="sum", label_smoothing=self.label_smoothing)
        ctc = ce.new_zeros(())
        if self.ctc_weight > 0:
            text = (targets >= 0) & (targets < self.n_text)  # text tokens only: no eot, no pad
            log_probs = self.model.ctc_logits(xa).log_softmax(-1).transpose(0, 1)  # (S, B, V)
            ctc = F.ctc_loss(log_probs, targets[text], xa_lens, text.sum(1), blank=self.pad_id,
                             reduction="sum", zero_infinity=True)
        return (1 - self.ctc_weight) * ce + self.ctc_weight * ctc, ce, ctc


def pad_to_window(batch: dict, p: float, rng_key: list, n_frames: int) -> list:
    """The batch as micro-batches. With probability p, part of it is shaped as openai-whisper, HF,
    faster-whisper and whisper.cpp feed it: clips padded to the encoder's full window (n_frames),
    no mask. The padding is zero features (faster-whisper pads the log-mel) or the clip's silence
    floor, max - 2 (the others pad the audio with zeros, which the log-mel clamps to max - 8 dB,
    i.e. max - 2 after scaling), ZERO_FILL_SHARE of them zeros.

    Only k clips are padded, k such that the padded micro-batch holds no more frames than the batch
    tensor did: a whole batch of 5 s clips padded to 30 s would cost 6-8 times as much. The other
    clips stay a micro-batch of their own length in the same step, so no clip is lost."""
    if p == 0:
        return [batch]
    rng = np.random.default_rng(rng_key)
    if rng.random() >= p:
        return [batch]
    mel, lens = batch["mel"], batch["mel_lens"]
    B = mel.shape[0]
    k = min(B, max(1, B * mel.shape[-1] // n_frames))
    rows = sorted(rng.choice(B, k, replace=False).tolist())
    rest = [b for b in range(B) if b not in rows]
    full = torch.zeros(k, mel.shape[1], n_frames)
    for i, b in enumerate(rows):
        n = int(lens[b])
        if rng.random() >= ZERO_FILL_SHARE:
            full[i] = float(mel[b, :, :n].max()) - 2.0
        full[i, :, :n] = mel[b, :, :n]
    padded = {**take_rows(batch, rows), "mel": full, "mel_lens": torch.full((k,), n_frames),
              "audio_frames": int(lens[rows].sum())}
    return [padded] + ([take_rows(batch, rest)] if rest else [])


def take_rows(batch: dict, rows: list) -> dict:
    """The clips `rows` of a collated batch, their mels trimmed to the longest of them (tokens keep
    the batch's length: the extra positions are padding, which the loss ignores)."""
    idx = torch.tensor(rows)
    lens = batch["mel_lens"][idx]
    out = {**batch, "mel": batch["mel"][idx, :, : int(lens.max())], "mel_lens": lens,
           "tokens_in": batch["tokens_in"][idx], "targets": batch["targets"][idx], "size": len(rows)}
    for key in ("ids", "indices"):
        if key in batch:
            out[key] = [batch[key][r] for r in rows]
    return out


def placeholder_batch(tokenizer, language: str, n_mels: int) -> dict:
    """One second of silence with no targets, run with loss weight 0 by a DDP rank whose batch
    was all unreadable clips (see Trainer.epoch_steps)."""
    prompt = list(tokenizer.sot_sequence(language))
    n = FRAMES_PER_SECOND
    return {"mel": torch.zeros(1, n_mels, n), "mel_lens": torch.tensor([n]), "tokens_in": torch.tensor([prompt]),
            "targets": torch.full((1, len(prompt)), tokenizer.pad), "size": 0, "placeholder": True}


def oom_message(micro: list, max_batch_seconds: Optional[float]) -> str:
    sizes = [int(b["mel_lens"].numel()) * int(b["mel_lens"].max()) / FRAMES_PER_SECOND for b in micro]
    return (f"error: CUDA out of memory on a step of {len(micro)} micro-batch(es), the largest {max(sizes):.0f} "
            f"padded s ({sum(sizes):.0f} padded s in all). Lower --max-batch-seconds (now {max_batch_seconds}) "
            f"or --train-batch-size and raise --grad-accum, or add --grad-checkpointing / --dtype fp16")


def check_eval_lm(opts: TrainOptions, tokenizer, n_vocab: int) -> None:
    """Load --eval-lm-path once before training, so a wrong file fails now, not at the first
    evaluation."""
    if opts.eval_lm_path:  # read by every dev evaluation, whatever its weight
        try:
            with_language_model(DecodingOptions(lm_path=opts.eval_lm_path, lm_weight=opts.eval_lm_weight or 1.0),
                                tokenizer, n_vocab)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --eval-lm-path {opts.eval_lm_path}: {e}") from None


def dev_evaluate(model: Whisper, tokenizer, utts: list, opts: TrainOptions, amp,
                 max_new_tokens: Optional[int] = None) -> dict:
    """Real decoding of the dev clips with the --eval-* settings (never teacher-forced), scored
    with jiwer: the same path as transcribe.py --mode evaluate."""
    utts = utts[: opts.max_eval_utts] if opts.max_eval_utts else utts
    options = DecodingOptions(language=opts.language, beam_size=opts.eval_beam_size, ctc_weight=opts.eval_ctc_weight,
                              lm_path=opts.eval_lm_path, lm_weight=opts.eval_lm_weight,
                              length_bonus=opts.eval_length_bonus, max_new_tokens=max_new_tokens)
    options = with_language_model(options, tokenizer, model.dims.n_vocab)
    was_training = model.training
    model.eval()
    with torch.no_grad(), amp:
        scores = evaluate(model, tokenizer, [(u.audio, u.text) for u in utts], options, opts.eval_batch_size)
    model.train(was_training)
    return scores


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batches_done: int = 0  # batches of `epoch` consumed by completed optimizer steps
    best_cer: float = float("inf")
    nan_streak: int = 0
    nan_skipped: int = 0
    data_errors: int = 0
    adapting: bool = False  # in the --pad-adapt-steps phase
    best_ema_cer: float = float("inf")
    budget_steps: int = 0  # --time-budget: the schedule's length it chose (kept on resume)
    budget_adapt_steps: int = 0
    evaluated_step: int = -1  # the step of the last evaluation this state was saved after


class StopRequest:
    """First Ctrl-C: finish the current step, save, exit. Second Ctrl-C: stop at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
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


class OptimizerStep:
    """One optimizer step: the loss module (DDP-wrapped on several ranks), AdamW, GradScaler and
    autocast, in nanoGPT's order (scale -> backward -> unscale_ -> clip -> step -> update -> zero_grad)."""

    def __init__(self, model: Whisper, tokenizer, opts: TrainOptions, device: torch.device, ddp: Dist):
        self.model, self.opts, self.device, self.ddp, self.pad = model, opts, device, ddp, tokenizer.pad
        self.loss_module = LossModule(model, tokenizer.pad, tokenizer.n_text, opts.label_smoothing, opts.ctc_weight)
        self.wrapped = self.loss_module
        if ddp.world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.wrapped = torch.nn.parallel.DistributedDataParallel(self.loss_module, device_ids=ids)
        self.optimizer = configure_optimizer(model, opts, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=opts.dtype == "fp16")
        self.amp = torch.autocast(device.type, dtype=getattr(torch, canonical_dtype(opts.dtype)),
                                  enabled=opts.dtype != "fp32")

    def __call__(self, micro: list, lr: float) -> dict:
        """Forward/backward each micro-batch (DDP syncs on the last only), unscale, clip, step; the
        loss normalised by the whole step's target tokens (all ranks)."""
        o, pad = self.opts, self.pad
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        n_tok = torch.tensor(float(sum(int((b["targets"] != pad).sum()) for b in micro)), device=self.device)
        if self.ddp.world > 1:
            dist.all_reduce(n_tok)
        n_tok = n_tok.clamp(min=1.0)  # a step of placeholders only (every rank's clips unreadable)
        sums = torch.zeros(2, device=self.device)
        for i, b in enumerate(micro):
            last = i == len(micro) - 1
            with contextlib.nullcontext() if self.ddp.world == 1 or last else self.wrapped.no_sync():
                with self.amp:
                    loss, ce, ctc = self.wrapped(*(b[k].to(self.device, non_blocking=True)
                                                   for k in ("mel", "mel_lens", "tokens_in", "targets")))
                # DDP averages gradients over ranks, so scale by world to get the global sum / tokens
                weight = 0.0 if b.get("placeholder") else self.ddp.world / n_tok
                self.scaler.scale(loss * weight).backward()
            if not b.get("placeholder"):
                sums += torch.stack([ce.detach().float(), ctc.detach().float()])
        self.scaler.unscale_(self.optimizer)
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip if o.grad_clip > 0 else float("inf"))
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
                      if not b.get("placeholder")) / FRAMES_PER_SECOND * self.ddp.world
        return {"lr": lr, "ce": float(sums[0] / n_tok), "ctc": float(sums[1] / n_tok), "finite": finite,
                "audio_s": audio_s, "tokens": int(n_tok), "gnorm": float(gnorm)}


class Trainer:
    """Everything the loop needs, built once from the options; `run` is the loop."""

    def __init__(self, opts: TrainOptions):
        self.opts = o = opts
        self.ddp = setup_distributed(o.device if o.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.device = resolve_device(o, self.ddp)
        resume_path = check_output_dir(o)
        self.out = Path(o.output_dir)
        seed_everything(o.seed)  # before any random init: the same seed gives the same run
        ckpt = load_checkpoint(resume_path) if resume_path else None
        self.report = D.DataReport()
        splits = load_data(o, self.report)
        source = read_init_source(o, ckpt)
        self.tokenizer = make_tokenizer(o, [u.text for u in splits[o.train_split]], ckpt, source)
        self.model = build_model(o, self.tokenizer, ckpt, self.device, source)
        self.splits = usable_splits(o, splits, self.tokenizer, self.model.dims.n_text_ctx, self.report)
        self.train_utts, self.dev_utts = self.splits[o.train_split], self.splits[o.dev_split]
        # saved with every checkpoint: long-form cuts chunks shaped like the clips it learned from
        durations = sorted(u.duration for u in self.train_utts)
        self.clip_seconds = {"longest_clip_seconds": durations[-1], "median_clip_seconds": durations[len(durations) // 2]}
        check_eval_lm(o, self.tokenizer, self.model.dims.n_vocab)
        self.sampler, self.dataset = build_batches(o, self.train_utts, self.tokenizer, self.model.dims.n_mels, self.ddp)
        self.steps_per_epoch = math.ceil(len(self.sampler) / o.grad_accum)
        self.set_schedule(o.max_steps or o.num_epochs * self.steps_per_epoch, o.pad_adapt_steps)
        self.optim = OptimizerStep(self.model, self.tokenizer, o, self.device, self.ddp)
        # the same objects, named as tests and benchmarks reach them
        self.loss_module, self.optimizer, self.scaler, self.amp = (self.optim.loss_module, self.optim.optimizer,
                                                                   self.optim.scaler, self.optim.amp)
        self.state = TrainState()
        self.ema = Ema(self.model, o.ema_decay) if o.ema_decay else None
        if ckpt is not None:
            try:
                self.restore(ckpt)
            except ValueError as e:  # the sampler's order belongs to its seed and world size
                raise SystemExit(f"error: --resume {resume_path}: {e}; resume with the run's --seed and number of "
                                 f"processes") from None
            note = resume_changes(ckpt.get("options") or {}, o, bool(self.state.budget_steps))
            if note and self.ddp.main:
                print(note, file=sys.stderr, flush=True)
        if not self.dev_utts and self.ddp.main:
            print(f"note: the dev split {o.dev_split!r} has no clips: evaluations score nothing and no best_model.pt "
                  f"is written (give --dev-split a split with clips)", file=sys.stderr, flush=True)
        self.history, self.last_eval = [], {}
        self.t_start, self.t_measure = time.time(), None
        self.eval_seconds, self.budget_mark = 0.0, None  # --time-budget: evaluation time, last fit (step, time, evals)

    def run(self) -> dict:
        """The loop: this epoch's optimizer steps -> log -> evaluate and save, until --max-steps,
        --stop-after or Ctrl-C; then a last evaluation (or save) and the closing line."""
        o, st = self.opts, self.state
        if o.resume and st.step >= self.total_steps and st.evaluated_step == st.step:  # finished and evaluated
            if self.ddp.main:
                further = ("its --time-budget schedule is kept: start a new run with --init-from it to train further"
                           if st.budget_steps else "raise --max-steps to train further")
                print(f"{self.out}/last.pt: already finished at step {st.step} of {self.total_steps}; nothing to do "
                      f"({further})", flush=True)
            return self.summary(interrupted=False)
        if self.ddp.main:  # check_output_dir made the folder
            print(opening(self), flush=True)
        self.log = TrainLog(self.out, self.ddp.main, o.resume, self.total_steps, st.step, o.progress,
                            o.log_every, o.ctc_weight > 0)
        with StopRequest() as stop:
            while not self.finished(stop):
                for micro, consumed, partial in self.epoch_steps():
                    self.maybe_start_adapting()
                    stats = self.step_or_explain_oom(micro)
                    self.check_finite(stats)
                    st.step, st.batches_done = st.step + 1, consumed
                    if self.ema is not None:
                        self.ema.update(self.model)
                    self.plan_budget()
                    self.history.append((st.step, stats["ce"], stats["ctc"]))
                    self.log.step(st.step, st.epoch, stats)
                    if st.step % o.eval_every == 0 or st.step in (self.schedule_steps, self.total_steps):
                        self.evaluate_and_save()
                    if not partial and self.finished(stop):
                        break
                else:  # the whole epoch was trained on
                    st.epoch, st.batches_done = st.epoch + 1, 0
                    self.sampler.set_epoch(st.epoch)
        stopped_early = st.step < self.total_steps
        if not stopped_early and st.step > 0 and st.evaluated_step != st.step:
            self.evaluate_and_save()
        elif stopped_early or st.step == 0:
            self.save("last.pt")
        self.log.close()
        if self.ddp.main:
            print(closing(self, stopped_early), flush=True)
        return self.summary(interrupted=stop.requested and stopped_early)

    def summary(self, interrupted: bool) -> dict:
        """What `train` returns (interrupted: stopped by Ctrl-C before the schedule's end)."""
        st = self.state
        return {"step": st.step, "best_cer": st.best_cer, "last_eval": self.last_eval, "history": self.history,
                "nan_skipped": st.nan_skipped, "data_errors": st.data_errors, "interrupted": interrupted}

    def set_schedule(self, schedule_steps: int, adapt_steps: int) -> None:
        self.schedule_steps, self.adapt_steps = schedule_steps, adapt_steps
        self.total_steps = schedule_steps + adapt_steps
        if hasattr(self, "log"):
            self.log.bar.total = self.total_steps

    def plan_budget(self) -> None:
        """--time-budget: time steps BUDGET_SKIP.. +BUDGET_MEASURE and one small dev decode, then
        fix the schedule so that its steps, the adaptation and every evaluation fit the minutes
        left. Before that the LR is in its linear warmup, which does not depend on the length."""
        o, st = self.opts, self.state
        if o.time_budget is None or st.budget_steps:
            return
        if st.step < BUDGET_SKIP or self.t_measure is None:
            self.t_measure = (st.step, time.time()) if st.step >= BUDGET_SKIP else None
            return
        first, t0 = self.t_measure
        if st.step - first < BUDGET_MEASURE:
            return
        per_step = (time.time() - t0) / (st.step - first)
        self.fit_budget(per_step, self.time_evaluation())

    def replan_budget(self, eval_seconds: float) -> None:
        """--time-budget, after each evaluation before the adaptation: fit the schedule again to
        the step time measured since the last fit (evaluations excluded) and to this evaluation's
        real cost. A 20-step warm-up can be far off: on the CPU demo it measured 1.17 s/step and
        the run went on at 1.3-1.7 s, 22 % over its 20 min. The cosine is stretched or shrunk from
        here on. A resumed run keeps its schedule (its earlier minutes are not known here)."""
        o, st = self.opts, self.state
        self.eval_seconds += eval_seconds
        if o.time_budget is None or not st.budget_steps or o.resume or st.adapting or self.budget_mark is None:
            return
        step0, t0, evals0 = self.budget_mark
        if st.step - step0 < BUDGET_MEASURE or st.step >= self.schedule_steps:
            return
        per_step = (time.time() - t0 - (self.eval_seconds - evals0)) / (st.step - step0)
        self.fit_budget(per_step, eval_seconds)

    def fit_budget(self, per_step: float, per_eval: float) -> None:
        """The largest schedule (steps, adaptation, the evaluations still to come) that fits the
        budget's minutes left at these costs; rank 0's choice is every rank's."""
        o, st = self.opts, self.state
        left = o.time_budget * 60 - (time.time() - self.t_start)
        adapt = o.pad_adapt_fraction or 0.0
        n = st.step
        while True:
            m = n + 10
            cost = (m - st.step) * per_step + round(adapt * m) * per_step * ADAPT_STEP_COST
            evals = m // o.eval_every - st.step // o.eval_every + 2 if self.ddp.main else 0
            if cost + evals * per_eval > left:
                break
            n = m
        adapt_steps = round(adapt * n) if o.pad_adapt_fraction is not None else o.pad_adapt_steps
        if self.ddp.world > 1:  # ranks time differently (only rank 0 evaluates): they must agree
            plan = torch.tensor([n, adapt_steps], device=self.device)
            dist.broadcast(plan, 0)
            n, adapt_steps = (int(v) for v in plan.tolist())
        replan = bool(st.budget_steps)
        self.budget_mark = (st.step, time.time(), self.eval_seconds)
        if replan and (n, adapt_steps) == (st.budget_steps, st.budget_adapt_steps):
            return
        st.budget_steps, st.budget_adapt_steps = n, adapt_steps
        self.set_schedule(n, adapt_steps)
        if not self.ddp.main:  # every rank fits the same plan; one says it
            return
        tqdm.write(f"--time-budget {o.time_budget:g} min{' (fitted again)' if replan else ''}: {per_step:.2f} s/step, "
                   f"~{per_eval:.0f} s per evaluation, {left / 60:.1f} min left -> {n} steps"
                   + (f" + {adapt_steps} adaptation steps" if adapt_steps else ""))
        if n < 2 * o.warmup_steps and not replan:  # the learning rate would spend the run climbing
            tqdm.write(f"note: {n} steps are fewer than twice --warmup-steps {o.warmup_steps}: the learning rate "
                       f"climbs for {min(n, o.warmup_steps)} of them and decays in the {max(0, n - o.warmup_steps)} "
                       f"left; a longer --time-budget or a smaller --warmup-steps (e.g. {max(1, n // 10)}) trains better")

    def time_evaluation(self) -> float:
        """Seconds one dev evaluation will take, from decoding a few dev clips now (x2 with EMA).
        An untrained model never ends a hypothesis, so the probe is held to the references' mean
        length, what a trained model decodes (unheld, the CPU demo's probe said 100 s, not 35)."""
        if not self.ddp.main or not self.dev_utts:
            return 0.0
        probe = self.dev_utts[:8]
        mean_tokens = sum(len(self.tokenizer.encode(u.text)) + 1 for u in probe) // len(probe)
        t0 = time.time()
        dev_evaluate(self.model, self.tokenizer, probe, self.opts, self.amp, max(1, mean_tokens))
        n = min(len(self.dev_utts), self.opts.max_eval_utts or len(self.dev_utts))
        return (time.time() - t0) * n / len(probe) * (2 if self.ema is not None else 1)

    def finished(self, stop: StopRequest) -> bool:
        st, o = self.state, self.opts
        return st.step >= self.total_steps or stop.requested or bool(o.stop_after and st.step >= o.stop_after)

    def epoch_steps(self):
        """This epoch's remaining batches grouped into optimizer steps: yields (micro-batches,
        batches consumed, partial). The epoch's last step may hold fewer than --grad-accum."""
        o, st = self.opts, self.state
        self.sampler.set_epoch(st.epoch)
        self.dataset.set_epoch(st.epoch)
        consumed, micro, n_batches = st.batches_done, [], 0
        for batch in D.make_loader(self.dataset, self.sampler, o.num_workers):
            consumed += 1
            for err in batch["errors"]:
                st.data_errors += 1
                tqdm.write(f"skipped unreadable clip: {err}", file=sys.stderr)
            if batch["size"]:
                micro += self.maybe_pad_to_window(batch, n_batches)
            elif self.ddp.world > 1:
                # every clip of this batch was unreadable on this rank alone: the others still run a
                # forward/backward for it, so this rank must too or the gradient all-reduce hangs
                micro.append(placeholder_batch(self.tokenizer, self.opts.language, self.model.dims.n_mels))
            n_batches += 1
            if n_batches == o.grad_accum:
                yield micro, consumed, False
                micro, n_batches = [], 0
        if micro:
            yield micro, consumed, True

    def step(self, micro: list) -> dict:
        """One optimizer step over the micro-batches at this step's learning rate."""
        return self.optim(micro, get_lr(self.state.step, self.opts, self.schedule_steps))

    def maybe_pad_to_window(self, batch: dict, index: int) -> list:
        """See pad_to_window; seeded by (seed, step, batch), so exact resume still holds."""
        rng_key = [self.opts.seed, self.state.step, index, PAD_SALT]
        p = 1.0 if self.state.step >= self.schedule_steps else self.opts.pad_to_30s_prob
        return pad_to_window(batch, p, rng_key, 2 * self.model.dims.n_audio_ctx)

    def maybe_start_adapting(self) -> None:
        """At the first --pad-adapt-steps step: best_model.pt is chosen among adapted models only
        (an earlier one, better on unpadded dev clips, would not survive the 30 s tools)."""
        st = self.state
        if self.adapt_steps and st.step >= self.schedule_steps and not st.adapting:
            st.adapting, st.best_cer, st.best_ema_cer = True, float("inf"), float("inf")
            tqdm.write(f"step {st.step}: {self.adapt_steps} steps of 30 s padding adaptation begin")

    def step_or_explain_oom(self, micro: list) -> dict:
        try:
            return self.step(micro)
        except torch.cuda.OutOfMemoryError:
            raise SystemExit(oom_message(micro, self.opts.max_batch_seconds)) from None

    def check_finite(self, stats: dict) -> None:
        """Count non-finite steps; many in a row means training diverged: save and stop."""
        st = self.state
        if stats["finite"]:
            st.nan_streak = 0
            return
        st.nan_streak += 1
        st.nan_skipped += 1
        if st.nan_streak >= self.opts.max_nan_steps:
            self.save("last.pt")  # the weights are those before the bad steps: the last good state
            raise SystemExit(
                f"error: {st.nan_streak} consecutive steps had a non-finite loss or gradient (last loss "
                f"{stats['ce']}); saved the last good state to {self.out / 'last.pt'}. Lower --learning-rate, "
                f"raise --warmup-steps, or use --dtype bf16/fp32")

    def evaluate_and_save(self) -> None:
        st = self.state
        st.evaluated_step = st.step  # on every rank: they must agree on when to meet at the barrier
        started = time.time()
        if self.ddp.main:
            scores = dev_evaluate(self.model, self.tokenizer, self.dev_utts, self.opts, self.amp)
            self.last_eval = {"step": st.step, **scores}
            if scores:
                self.log.evaluation(st.step, st.epoch, scores)
                if scores["cer"] < st.best_cer:
                    st.best_cer = scores["cer"]
                    self.save("best_model.pt")
            self.snapshot(scores)
            if self.ema is not None:
                self.evaluate_ema()
        self.replan_budget(time.time() - started if self.ddp.main else 0.0)  # on every rank: they share the plan
        if self.ddp.main:
            self.save("last.pt")  # with the plan resume must keep
        if self.ddp.world > 1:
            dist.barrier()

    def snapshot(self, scores: dict) -> None:
        """step-N.pt: these weights and their dev scores, for averaging; the oldest beyond
        --keep-checkpoints are deleted."""
        if self.opts.keep_checkpoints:
            self.write_weights(snapshot_name(self.state.step), scores)
            prune_snapshots(self.out, self.opts.keep_checkpoints)

    def evaluate_ema(self) -> None:
        """The averaged weights decoded like the raw ones; ema.pt always, best_ema.pt when best."""
        st = self.state
        with self.ema.applied(self.model):
            scores = dev_evaluate(self.model, self.tokenizer, self.dev_utts, self.opts, self.amp)
            if scores:
                self.log.evaluation(st.step, st.epoch, scores, "ema")
            names = ["ema.pt"] + (["best_ema.pt"] if scores and scores["cer"] < st.best_ema_cer else [])
            for name in names:
                self.write_weights(name, scores)
        if scores and scores["cer"] < st.best_ema_cer:
            st.best_ema_cer = scores["cer"]

    def write_weights(self, name: str, scores: dict) -> None:
        """A weights-only checkpoint (snapshots, EMA): loadable like best_model.pt, with its dev scores."""
        dev = {k: v for k, v in scores.items() if isinstance(v, (int, float))}
        self.save(name, weights_only=True, step=self.state.step, dev=dev)

    def save(self, name: str, weights_only: bool = False, **extra) -> None:
        if not self.ddp.main:
            return
        if not weights_only:  # everything --resume needs
            extra.update(optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
                         sampler=self.sampler.state_dict(self.state.batches_done), state=asdict(self.state),
                         rng=rng_state(), **({"ema": self.ema.state_dict()} if self.ema is not None else {}))
        save_checkpoint(self.out / name, self.model, self.tokenizer, options=asdict(self.opts), **self.clip_seconds,
                        **extra)

    def restore(self, ckpt: dict) -> None:
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(**ckpt["state"])
        self.sampler.load_state_dict(ckpt["sampler"])
        set_rng_state(ckpt["rng"])
        if self.state.budget_steps:  # the schedule --time-budget chose, not a new one
            self.set_schedule(self.state.budget_steps, self.state.budget_adapt_steps)
        if self.ema is not None and "ema" in ckpt:
            self.ema.load_state_dict(ckpt["ema"])


def train(opts: TrainOptions) -> dict:
    """Build everything from `opts`, train, and return a summary (the loss history included)."""
    trainer = Trainer(opts)
    try:
        return trainer.run()
    finally:
        if trainer.ddp.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
