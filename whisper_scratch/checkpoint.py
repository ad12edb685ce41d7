"""Checkpoints: dims + tokenizer + weights (+ whatever the trainer adds: optimizer, sampler, RNG
states), primitives and tensors only, so they load with torch.load(weights_only=True) and describe
themselves."""
from __future__ import annotations

import contextlib
import copy
import errno
import os
import random
import re
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from . import foreign_files as foreign
from .config import option, require
from .model import ModelDimensions, Whisper
from .tokenizer import Tokenizer, tokenizer_from_dict

FORMAT = "whisper_scratch"
VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a checkpoint this code can load; the message names the file, says what
    it is and what to do. A ValueError, so callers that catch those keep working."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only folder); the previous file is intact."""


# atomic_save's temporaries: .NAME.PID.RANDOM.tmp (mkstemp's random part has no dots)
_TMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list:
    """Delete what a killed atomic_save left behind: `.NAME.PID.xxxx.tmp` files whose writer
    process is gone (a live writer's file is left alone). Returns the paths removed."""
    removed = []
    for p in folder.glob(".*.tmp"):
        m = _TMP_NAME.fullmatch(p.name)
        if m and not _pid_alive(int(m.group("pid"))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _write_error(e: OSError, path: Path, tmp: str) -> CheckpointWriteError:
    what = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    return CheckpointWriteError(
        e.errno, f"could not write the checkpoint {path}: {what} ({errno.errorcode.get(e.errno, e.errno)} while "
                 f"writing {tmp}); the previous {path.name}, if any, is intact. Free space in {path.parent} "
                 f"or choose another --output-dir, then --resume")


def atomic_save(obj, path: Union[str, os.PathLike]) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`, so a
    crash or Ctrl-C mid-write never leaves a truncated checkpoint behind; a write that fails (disk
    full) raises CheckpointWriteError and leaves the previous file as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    # the pid in the name tells a later run whether the writer of a leftover is still alive
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, CheckpointWriteError):
            raise _write_error(e, path, tmp) from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def save_checkpoint(path, model: Whisper, tokenizer: Tokenizer, **extra) -> None:
    """Write {format, version, dims, tokenizer, model, **extra} atomically."""
    ckpt = {"format": FORMAT, "version": VERSION, "dims": model.dims.to_dict(),
            "tokenizer": tokenizer.to_dict(), "model": model.state_dict(), **extra}
    atomic_save(ckpt, path)


def read_checkpoint_file(path, map_location: Union[str, torch.device] = "cpu"):
    """What a .pt file holds, read safely: a file that is no torch checkpoint at all is a
    CheckpointError saying what it is (empty, text, truncated, pickled code, a folder) and what to
    do; a pickle that would run code is never unpickled (weights_only). Whose checkpoint it is,
    the callers judge (load_checkpoint: ours; warmstart.read_source: ours or openai-whisper's)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: {foreign.describe_folder(path)}")
    problem = foreign.sniff(path)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    try:
        with warnings.catch_warnings():  # torch warns about plain pickles' protocol; the error below says more
            warnings.simplefilter("ignore", UserWarning)
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for bad files; say which kind of bad it is
        raise CheckpointError(f"{path}: {foreign.explain_load_failure(path, e)}") from None
    return ckpt


def load_checkpoint(path, map_location: Union[str, torch.device] = "cpu") -> dict:
    """Read a checkpoint written by save_checkpoint. Anything else is a CheckpointError that says
    what the file is (empty, text, truncated, pickled code, another tool's model) and what to do."""
    ckpt = read_checkpoint_file(path, map_location)
    path = Path(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: {foreign.describe_object(path, ckpt)}")
    return check_version_and_keys(path, ckpt)


def check_version_and_keys(path: Path, ckpt: dict) -> dict:
    version = ckpt.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: the checkpoint's format version is {version!r}, not a number; the file "
                              f"was not written by whisper_scratch's save_checkpoint")
    if version > VERSION:
        raise CheckpointError(f"{path}: written by a newer whisper_scratch (checkpoint format version {version}; "
                              f"this code reads up to {VERSION}): update whisper_scratch to load it")
    missing = [k for k in ("dims", "tokenizer", "model") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: an incomplete whisper_scratch checkpoint: no {', '.join(missing)}")
    return ckpt


def check_device(name: Union[str, torch.device]) -> torch.device:
    """`name` as a device this machine has, else a ValueError that says so (not a failure to
    read the checkpoint onto it)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is available (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type in ("mps", "xpu"):  # the other accelerators torch runs these models on
        backend = getattr(torch, device.type, None)
        if backend is None or not backend.is_available():
            raise ValueError(f"--device {name}: no {device.type} device is available here (use cpu or cuda)")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: not a device this runs on (cpu, cuda, cuda:N, mps, xpu)")
    return device


def load_model(path, device: Union[str, torch.device] = "cpu",
               ckpt: Optional[dict] = None) -> tuple:
    """Rebuild (model, tokenizer, checkpoint) from the dims and tokenizer the checkpoint carries."""
    ckpt = ckpt if ckpt is not None else load_checkpoint(path, device)
    try:
        dims = ModelDimensions.from_dict(ckpt["dims"])
        with torch.device("meta"):  # skip the random init: every weight is overwritten next
            model = Whisper(dims)
        # assign=True adopts the saved tensors; every buffer is persistent (the encoder's sinusoid table
        # is openai's `positional_embedding` key), so nothing on the meta device is left behind
        model.load_state_dict(ckpt["model"], strict=True, assign=True)
        tokenizer = tokenizer_from_dict(ckpt["tokenizer"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # edited or damaged contents
        raise CheckpointError(f"{path}: a whisper_scratch checkpoint whose contents do not fit together "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    return model.to(device).eval(), tokenizer, ckpt


def rng_state() -> dict:
    """Python, numpy and torch (and CUDA) RNG states as tensors and primitives, so a resumed run
    draws the same augmentation and dropout-free randomness as an uninterrupted one."""
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


def precision(dtype: Optional[str], device: Union[str, torch.device]):
    """The context to run a loaded model in: autocast for float16/bfloat16 (LayerNorm and the
    logits stay fp32), nothing for float32; dtype None = float16 on cuda, else float32."""
    device = str(device)
    name = dtype or ("float16" if device.startswith("cuda") else "float32")
    if name == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, name))


QUANTIZE = ("int8", "bf16")


def quantize_option():
    """The --quantize field of every decoding entry point (transcribe.py, the server)."""
    return option(None, "int8: int8 weights in every linear layer (dynamic quantisation, CPU only); bf16: every "
                        "weight but the LayerNorms in bfloat16, activations too (fastest on CPUs with AMX: "
                        "bench/vs_decode.py measures speed, bench/RESULTS.md accuracy)", choices=(None,) + QUANTIZE)


def check_quantize(scheme: Optional[str], dtype: Optional[str]) -> Optional[str]:
    """Options check: quantised weights set the activations' precision themselves (int8: float32,
    bf16: bfloat16), so no autocast dtype may be given beside them (dtype already canonical).
    Returns the dtype to run in: "float32" (no autocast, even on a GPU) with quantised weights."""
    require(scheme is None or dtype in (None, "float32"),
            f"--quantize {scheme} sets the activations' precision itself; it cannot be combined with --dtype {dtype}")
    return dtype if scheme is None else "float32"


def quantize(model: torch.nn.Module, scheme: Optional[str], device: Union[str, torch.device]) -> torch.nn.Module:
    """The model for decoding with smaller weights. scheme None returns the model as it is.

    int8: every nn.Linear becomes a dynamically quantised one (weights int8 per tensor, activations
    quantised per batch at run time; torch's fbgemm/onednn kernels). Convolutions, embeddings,
    LayerNorms and the tied output projection stay fp32. CPU only: torch has no CUDA kernels for it.

    bf16: the model (converted in place) in bfloat16 except its LayerNorms, which normalise in fp32 and cast back (the
    encoder casts the mel to the conv's dtype; logits are returned in fp32). Unlike autocast, the
    weights are not cast again at every call: on a CPU with AMX the encoder runs 3.6x and batched
    greedy decoding 1.9x faster than fp32 (bench/RESULTS.md); on older CPUs it can be slower.
    On a CPU the model also keeps an fp32 copy of its decoder, `model.fp32_decoder` (not a
    submodule: state_dict and parameters are unchanged), for searches of few rows, where a bf16
    linear layer's fixed cost per call makes a step slower than in fp32 (decoding.Inference).
    Quantize last: a later model.to(...) does not move that copy (Inference then leaves it unused)."""
    if scheme is None:
        return model
    if scheme not in QUANTIZE:
        raise ValueError(f"--quantize must be one of {QUANTIZE} or none, got {scheme!r}")
    if scheme == "bf16":
        if torch.device(device).type == "cpu":
            object.__setattr__(model, "fp32_decoder", copy.deepcopy(model.decoder).float().eval())
        model = model.to(torch.bfloat16)
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.float()
        return model
    if torch.device(device).type != "cpu":
        raise ValueError(f"--quantize {scheme} runs on the CPU only, got --device {device}")
    # torch 2.13 flags torch.ao.quantization and its quantised tensor types as deprecated (torchao
    # is the successor); the pinned torch still ships and tests them, so users see no warning per run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.ao.quantization import quantize_dynamic
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
