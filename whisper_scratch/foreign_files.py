"""What a file that is not a whisper_scratch checkpoint is, in words a user can act on: empty,
text, truncated, pickled code, or another tool's model (openai-whisper, Hugging Face, CTranslate2,
whisper.cpp). checkpoint.load_checkpoint asks here only once a file has failed to load as ours.

Pickled code is found by reading the pickle's opcodes (pickletools), never by unpickling it.
A leaf module: it imports nothing from the package.
"""
from __future__ import annotations

import pickletools
import struct
import zipfile
from pathlib import Path
from typing import Optional

TRAINED_BY_US = "use a checkpoint written by train.py (OUT/best_model.pt or OUT/last.pt)"
EXPORTED = "if it is one of our exports, pass the .pt it was exported from"
# modules whose functions, once a pickle names them, run commands or code when it is loaded
_CODE_MODULES = ("os", "posix", "nt", "subprocess", "builtins", "__builtin__", "sys", "importlib", "runpy",
                 "shutil", "socket", "pty", "webbrowser", "code", "codeop", "pickle", "_pickle", "marshal", "io",
                 "_io", "pathlib", "ctypes", "multiprocessing", "tempfile", "signal", "operator", "functools")
_STRING_OPS = ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING")
_GGML_MAGIC = b"lmgg"  # 0x67676d6c little-endian: whisper.cpp's model files


def describe_folder(path: Path) -> str:
    names = {p.name for p in path.iterdir()}
    if "config.json" in names and names & {"model.safetensors", "pytorch_model.bin"}:
        return ("a Hugging Face Transformers model folder (config.json + "
                f"{' + '.join(sorted(names & {'model.safetensors', 'pytorch_model.bin'}))}), not a whisper_scratch "
                f"checkpoint; this toolkit does not load HF weights (train.py --init-from takes an openai-whisper "
                f".pt); {EXPORTED}, else {TRAINED_BY_US}")
    if "config.json" in names and "model.bin" in names:
        return (f"a CTranslate2 model folder (run it with faster-whisper), not a whisper_scratch checkpoint; {EXPORTED}, "
                f"else {TRAINED_BY_US}")
    ours = sorted(names & {"best_model.pt", "last.pt"})
    if ours:
        return f"a folder (a training run's output): pass the file, e.g. {path / ours[0]}"
    return f"a folder, not a checkpoint file: {TRAINED_BY_US}"


def sniff(path: Path) -> Optional[str]:
    """What is wrong with the file, told from its first bytes; None if it may be a torch file."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return f"empty file (0 bytes), not a checkpoint; the copy or download was interrupted? {TRAINED_BY_US}"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return None  # a zip (torch.save) or a pickle (torch's legacy format, plain pickle.dump)
    if head[:4] == _GGML_MAGIC:
        return f"a GGML model for whisper.cpp (our --to ggml export), not a whisper_scratch checkpoint: {TRAINED_BY_US}"
    if _is_safetensors(head):
        return ("a safetensors file (Hugging Face weights), not a whisper_scratch checkpoint; this toolkit does not "
                f"load HF weights: {TRAINED_BY_US}")
    if _is_text(head):
        first = head.decode("utf-8", "replace").strip().splitlines()[0][:60] if head.strip() else ""
        return f"a text file (starting {first!r}), not a checkpoint: {TRAINED_BY_US}"
    return f"not a checkpoint (neither a torch zip archive nor a pickle): {TRAINED_BY_US}"


def _is_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length, then the JSON header
    return len(head) > 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] < 100_000_000


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut at the 4 KB boundary
            return False
    return b"\x00" not in head


def explain_load_failure(path: Path, error: Exception) -> str:
    """Why torch.load(weights_only=True) refused the file, in the user's terms."""
    code = sorted(_code_globals(path))
    if code:
        return (f"the file contains pickled code ({', '.join(code[:3])}) that would run if it were loaded; it was "
                f"NOT loaded. Only tensors and plain values are accepted; do not open this file with "
                f"torch.load(weights_only=False) unless you trust where it came from")
    if "weights only load failed" in str(error).lower():
        names = sorted(_all_globals(path))
        return (f"the file contains pickled Python objects ({', '.join(names[:3]) or 'unknown types'}), not only "
                f"tensors and plain values; it was not loaded (unpickling them could run code). {TRAINED_BY_US}")
    if _is_zip_start(path) and not zipfile.is_zipfile(path):
        return (f"truncated or corrupt: the zip archive torch.save writes is incomplete (an interrupted copy or "
                f"download?); copy it again, or {TRAINED_BY_US}")
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    return f"not a readable checkpoint, damaged or from another program ({type(error).__name__}: {first})"


def _is_zip_start(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _pickle_bytes(path: Path) -> bytes:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
            return z.read(name) if name else b""
    return path.read_bytes()


def _all_globals(path: Path) -> set:
    """module.name of every class or function the pickle refers to (GLOBAL, STACK_GLOBAL, INST)."""
    try:
        data = _pickle_bytes(path)
    except (OSError, zipfile.BadZipFile, KeyError):
        return set()
    found, strings, memo = set(), [], {}
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                found.add(arg.replace(" ", "."))
            elif op.name in _STRING_OPS:
                strings.append(arg if isinstance(arg, str) else arg.decode("latin-1"))
            elif op.name == "MEMOIZE" and strings:
                memo[len(memo)] = strings[-1]
            elif op.name in ("BINGET", "LONG_BINGET", "GET") and arg in memo:
                strings.append(memo[arg])
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.add(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # a damaged pickle: report what was read before the damage
        pass
    return found


def _code_globals(path: Path) -> set:
    return {g for g in _all_globals(path) if g.split(".")[0] in _CODE_MODULES}


def describe_object(path: Path, obj) -> str:
    """A file torch loaded that is not ours: say whose it looks like."""
    if isinstance(obj, dict) and "dims" in obj and "model_state_dict" in obj:
        return (f"an openai-whisper checkpoint (a dict with 'dims' and 'model_state_dict'), not a whisper_scratch "
                f"one: transcribe.py needs a model trained by train.py; to start training from its weights use "
                f"train.py --init-from {path}")
    if isinstance(obj, dict) and obj and all(hasattr(v, "shape") for v in obj.values()):
        return (f"a bare state dict ({len(obj)} tensors, e.g. {next(iter(obj))!r}; a Hugging Face pytorch_model.bin "
                f"looks like this), with no dims or tokenizer: not a whisper_scratch checkpoint. {TRAINED_BY_US}")
    if isinstance(obj, dict):
        return f"a torch file holding a dict with keys {sorted(map(str, obj))[:6]}, not a whisper_scratch checkpoint"
    return f"a torch file holding a {type(obj).__name__}, not a whisper_scratch checkpoint: {TRAINED_BY_US}"
