"""Averaged weights: the element-wise mean of several checkpoints (icefall's --avg, ESPnet's
average_nbest) and an exponential moving average kept during training.

    python -m whisper_scratch.average --dir exp/demo_mn --last 5 --output exp/demo_mn/avg5.pt
    python -m whisper_scratch.average --dir exp/demo_mn --best 3 --output exp/demo_mn/best3.pt
    python -m whisper_scratch.average --checkpoints A.pt B.pt C.pt --output avg.pt

The trainer writes a weights-only snapshot `step-NNNNNNN.pt` (with its dev scores) at every
evaluation and keeps the last --keep-checkpoints of them; --last and --best choose among those.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .checkpoint import atomic_save, load_checkpoint
from .config import option, output_problem, parse_options, require

SNAPSHOT = re.compile(r"^step-(\d+)\.pt$")


def snapshot_name(step: int) -> str:
    return f"step-{step:07d}.pt"


def snapshots(folder) -> List[Tuple[int, Path]]:
    """(step, path) of every evaluation snapshot in `folder`, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(folder).glob("step-*.pt") if (m := SNAPSHOT.match(p.name))]
    return sorted(found)


def prune_snapshots(folder, keep: int) -> None:
    """Delete all but the newest `keep` snapshots."""
    for _, path in snapshots(folder)[:-keep] if keep > 0 else snapshots(folder):
        path.unlink(missing_ok=True)


def choose(folder, last: Optional[int] = None, best: Optional[int] = None) -> List[Path]:
    """The newest `last` snapshots, or the `best` by the dev CER each one records."""
    found = snapshots(folder)
    if not found:
        raise FileNotFoundError(f"{folder}: no step-*.pt evaluation snapshots (train with --keep-checkpoints > 0)")
    if last is not None:
        return [p for _, p in found[-last:]]
    scored = []
    for _, p in found:
        cer = load_checkpoint(p).get("dev", {}).get("cer")
        if cer is not None:
            scored.append((cer, p))
    if not scored:
        raise ValueError(f"{folder}: its snapshots record no dev CER to rank them by; use --last")
    chosen = {p for _, p in sorted(scored, key=lambda x: x[0])[:best]}
    return [p for _, p in found if p in chosen]  # in step order: neighbours are compared (average_checkpoints)


# Measured on this repo's runs: snapshots of one run 400-2,000 steps apart 0.76-0.90; two FSDD folds
# trained from one seed (another run on other data) 0.38-0.47; runs from other seeds about 0.
SAME_RUN_COSINE = 0.6


def weight_cosine(a: dict, b: dict) -> float:
    """Cosine similarity of two state dicts over their weight matrices (not the LayerNorms, which
    start equal in every run, nor the fixed positional tables): how far apart two models are."""
    keys = [k for k, v in a.items() if v.ndim >= 2 and v.is_floating_point() and "positional" not in k]
    dot = sum(float((a[k].double() * b[k].double()).sum()) for k in keys)
    norm_a = sum(float(a[k].double().pow(2).sum()) for k in keys) ** 0.5
    norm_b = sum(float(b[k].double().pow(2).sum()) for k in keys) ** 0.5
    return dot / (norm_a * norm_b) if norm_a and norm_b else 0.0


def _require_finite(path, state: dict) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    require(not bad, f"{path}: NaN or inf in its weights ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}): "
                     f"a diverged snapshot would make the whole average NaN")


def average_checkpoints(paths: List[Path], mix_runs: bool = False) -> dict:
    """The first checkpoint with its weights replaced by the mean over all of them; the dims, the
    tokenizer and the weights' names must agree, every weight must be finite, and (unless
    mix_runs) each checkpoint's weights must be near the one before it in the list, as a run's
    neighbouring snapshots are (give them in step order, as --last and --best do), else the mean
    is meaningless: a clear error naming the file. Separately trained models average to a broken
    one (measured: two FSDD folds from one seed); mix_runs is for model soups of fine-tunes."""
    require(len(paths) >= 1, "nothing to average: give at least one checkpoint")
    twice = [p for i, p in enumerate(paths) if Path(p).resolve() in [Path(q).resolve() for q in paths[:i]]]
    require(not twice, f"{twice[0] if twice else ''}: given twice (it would weigh double)")
    first = load_checkpoint(paths[0])
    _require_finite(paths[0], first["model"])
    total = {k: v.double() if v.is_floating_point() else v for k, v in first["model"].items()}
    dev = [first.get("dev", {}).get("cer")]
    before, before_path = first["model"], paths[0]
    for path in paths[1:]:
        ck = load_checkpoint(path)
        dev.append(ck.get("dev", {}).get("cer"))
        for key in ("dims", "tokenizer"):
            if ck[key] != first[key]:
                raise ValueError(f"{path}: its {key} differ from {paths[0]}'s; only checkpoints of one run "
                                 f"(one model shape and vocabulary) can be averaged")
        odd = sorted(set(ck["model"]) ^ set(first["model"]))
        if odd:
            raise ValueError(f"{path}: its weights are not named as {paths[0]}'s (differ: {', '.join(odd[:5])}"
                             f"{' ...' if len(odd) > 5 else ''})")
        _require_finite(path, ck["model"])
        cos = weight_cosine(before, ck["model"])
        if not mix_runs and cos < SAME_RUN_COSINE:
            raise ValueError(f"{path}: its weights are far from {before_path}'s (cosine similarity {cos:.2f}; a run's "
                             f"snapshots 400-2,000 steps apart measured 0.76-0.90): models trained apart average to "
                             f"a broken model. If they are fine-tunes of one checkpoint, pass --mix-runs")
        before, before_path = ck["model"], path
        for k, v in ck["model"].items():
            if v.is_floating_point():
                total[k] += v.double()
    model = {k: (v / len(paths)).to(first["model"][k].dtype) if v.is_floating_point() else v for k, v in total.items()}
    keep = {k: v for k, v in first.items() if k not in ("optimizer", "scaler", "sampler", "rng", "state", "ema")}
    return {**keep, "model": model, "averaged_from": [str(p) for p in paths], "averaged_dev_cer": dev}


class Ema:
    """An exponential moving average of the weights (fp32), updated after every optimizer step;
    the decay ramps up as (1 + n) / (10 + n) so the early average is not stuck at the random init."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        state = model.state_dict()
        keys = list(self.shadow)
        torch._foreach_lerp_([self.shadow[k] for k in keys], [state[k].detach().float() for k in keys], 1.0 - d)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, d: dict) -> None:
        self.updates = int(d["updates"])
        self.shadow = {k: v.float() for k, v in d["shadow"].items()}

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module):
        """The model holds the averaged weights inside the block, its own again after it."""
        state = model.state_dict()
        raw = {k: state[k].detach().clone() for k in self.shadow}
        with torch.no_grad():
            for k, v in self.shadow.items():
                state[k].copy_(v)
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, v in raw.items():
                    state[k].copy_(v)


@dataclass(frozen=True)
class AverageOptions:
    """Average the weights of several checkpoints of one run into one checkpoint."""

    output: str = option(help="where to write the averaged checkpoint")
    checkpoints: Tuple[str, ...] = option((), "checkpoint files to average", nargs="*")
    dir: Optional[str] = option(None, "a training output folder: choose among its step-*.pt snapshots")
    last: Optional[int] = option(None, "average the newest N snapshots of --dir")
    best: Optional[int] = option(None, "average the N snapshots of --dir with the lowest dev CER")
    mix_runs: bool = option(False, "average checkpoints whose weights are far apart (fine-tunes of one checkpoint, "
                                   "a model soup); refused otherwise: separately trained models average to a "
                                   "broken one")

    def __post_init__(self):
        object.__setattr__(self, "checkpoints", tuple(self.checkpoints))
        chosen = [bool(self.checkpoints), self.last is not None, self.best is not None]
        require(sum(chosen) == 1, f"give exactly one of --checkpoints, --last N, --best N (got checkpoints="
                                  f"{list(self.checkpoints)}, last={self.last}, best={self.best})")
        for name in ("last", "best"):
            v = getattr(self, name)
            require(v is None or v >= 1, f"--{name} must be >= 1, got {v}")
            require(v is None or self.dir is not None, f"--{name} {v} chooses among the snapshots of --dir: give --dir")


def main(argv=None) -> int:
    opts = parse_options(AverageOptions, argv, prog="python -m whisper_scratch.average")
    try:
        require(not (problem := output_problem("--output", opts.output)), problem)
        if opts.dir and not Path(opts.dir).is_dir():
            raise FileNotFoundError(f"--dir {opts.dir}: no such folder")
        paths = [Path(p) for p in opts.checkpoints] or choose(opts.dir, opts.last, opts.best)
        asked = opts.last or opts.best
        if asked and len(paths) < asked:
            print(f"note: {opts.dir} holds {len(paths)} snapshot(s) to choose from, fewer than the {asked} asked; "
                  f"averaging {len(paths)}", file=sys.stderr)
        avg = average_checkpoints(paths, opts.mix_runs)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        atomic_save(avg, opts.output)
    except OSError as e:  # a folder that cannot be made or written, a full disk
        print(f"error: could not write {opts.output}: {os.strerror(e.errno) if e.errno else e}", file=sys.stderr)
        return 1
    dev = ["?" if c is None else f"{100 * c:.2f}" for c in avg["averaged_dev_cer"]]
    print(f"averaged {len(paths)} checkpoints ({', '.join(p.name for p in paths)}; dev CER % {', '.join(dev)}) "
          f"-> {opts.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
