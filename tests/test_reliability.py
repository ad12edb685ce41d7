"""Model files from elsewhere, a full disk, and folders with nothing to do: each gets one line that
names the file, says what it is and what to do; nothing hostile runs; nothing good is lost."""
import errno
import importlib.util
import json
import os
import pickle
import struct
import subprocess
import sys

import pytest
import torch

from whisper_scratch import model as M
from whisper_scratch.checkpoint import (CheckpointError, CheckpointWriteError, load_checkpoint, load_model,
                                        remove_stale_temporaries, save_checkpoint)
from whisper_scratch.model import ModelDimensions, Whisper
from whisper_scratch.tokenizer import CharTokenizer
from conftest import DATA, REPO

_spec = importlib.util.spec_from_file_location("transcribe_cli", REPO / "transcribe.py")
cli = sys.modules.setdefault("transcribe_cli", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(cli)
_spec = importlib.util.spec_from_file_location("train_cli", REPO / "train.py")
train_cli = sys.modules.setdefault("train_cli", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(train_cli)

TOK = CharTokenizer("zerontw", languages=("en",))
CLIP = DATA / "fsdd" / "recordings" / "0_george_5.wav"


def tiny_model():
    torch.manual_seed(0)
    return Whisper(ModelDimensions(80, 100, 32, 2, 1, TOK.vocab_size, 20, 32, 2, 1))


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.pt"
    save_checkpoint(path, tiny_model(), TOK)
    return path


class RunsCode:
    """Unpickling this calls os.system: it would create `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Opens:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def foreign_files(tmp_path, good) -> dict:
    """name -> (path, words the one-line message must hold)."""
    marker = tmp_path / "code_ran"
    files = {}

    def put(name, data, *words):
        p = tmp_path / name
        p.write_bytes(data) if isinstance(data, bytes) else torch.save(data, p)
        files[name] = (p, words)

    put("system.pt", {"model": RunsCode(marker)}, "contains pickled code", "posix.system", "NOT loaded")
    with open(tmp_path / "open.pkl", "wb") as f:  # a plain pickle, not torch's zip
        pickle.dump({"x": Opens(marker)}, f)
    files["open.pkl"] = (tmp_path / "open.pkl", ("contains pickled code", "io.open", "NOT loaded"))
    put("empty.pt", b"", "empty file (0 bytes)")
    put("text.pt", b"model: tiny\nsteps: 10\n", "a text file", "'model: tiny'")
    put("truncated.pt", good.read_bytes()[: good.stat().st_size // 2], "truncated or corrupt")
    put("random.pt", bytes(range(256)) * 4, "neither a torch zip archive nor a pickle")
    dims = {"n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": 384}
    put("openai.pt", {"dims": dims, "model_state_dict": {"encoder.conv1.weight": torch.zeros(2)}},
        "an openai-whisper checkpoint", "--init-from")
    put("pytorch_model.bin", {"model.encoder.conv1.weight": torch.zeros(2)}, "bare state dict", "Hugging Face")
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    put("model.safetensors", struct.pack("<Q", len(header)) + header + bytes(4), "safetensors", "Hugging Face")
    put("ggml-model.bin", struct.pack("<I", 0x67676D6C) + bytes(64), "GGML", "whisper.cpp")
    newer = torch.load(good, weights_only=True)
    put("newer.pt", {**newer, "version": 99}, "newer whisper_scratch", "version 99", "update")
    hf = tmp_path / "hf_model"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(files["model.safetensors"][0].read_bytes())
    files["hf_model"] = (hf, ("Hugging Face Transformers model folder", "config.json + model.safetensors"))
    return files


def test_foreign_and_hostile_files_get_a_clear_error_and_no_code_runs(tmp_path, good):
    files = foreign_files(tmp_path, good)
    for name, (path, words) in files.items():
        with pytest.raises(CheckpointError) as e:
            load_model(path)
        message = str(e.value)
        assert message.startswith(str(path)) and "\n" not in message, message
        for w in words:
            assert w in message, (name, message)
    assert not (tmp_path / "code_ran").exists()  # neither payload ran
    assert load_model(good)[0].dims.n_text_state == 32  # the real one still loads


def test_transcribe_model_path_on_foreign_files_is_one_line_and_status_2(tmp_path, good, capsys):
    for name, (path, words) in foreign_files(tmp_path, good).items():
        rc = cli.main(["--model_path", str(path), "--audio_path", str(CLIP), "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and str(path) in err and words[0] in err, (name, err)
    assert not (tmp_path / "code_ran").exists()


def test_transcribe_subprocess_has_no_traceback_and_runs_no_code(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({"model": RunsCode(marker)}, tmp_path / "evil.pt")
    p = subprocess.run([sys.executable, "transcribe.py", "--model_path", str(tmp_path / "evil.pt"),
                        "--audio_path", str(CLIP)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("transcribe.py: error: --model_path")
    assert "contains pickled code" in p.stderr and not marker.exists()


def test_transcribe_directory_without_audio_is_an_error(tmp_path, good, capsys):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("x")
    (folder / "sub" / "clip.mp4").write_bytes(b"x")
    for mode in ("directory", "batch"):
        rc = cli.main(["--model_path", str(good), "--mode", mode, "--audio_dir", str(folder), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and "no audio files" in err and str(folder) in err and "2 other file(s)" in err


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "run" / "last.pt"
    save_checkpoint(path, tiny_model(), TOK, state={"step": 1})
    before = path.read_bytes()
    real = torch.save

    def fills_the_disk(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")  # some bytes land, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", fills_the_disk)
    with pytest.raises(CheckpointWriteError) as e:
        save_checkpoint(path, tiny_model(), TOK, state={"step": 2})
    message = str(e.value)
    assert e.value.errno == errno.ENOSPC and "the disk is full" in message and "ENOSPC" in message
    assert str(path) in message and str(path.parent) in message and "intact" in message
    monkeypatch.setattr(torch, "save", real)
    assert path.read_bytes() == before and load_checkpoint(path)["state"] == {"step": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary left behind


def test_train_py_says_the_disk_is_full_and_where(tmp_path, monkeypatch, capsys):
    """train.py end to end: the fourth checkpoint write (step 1 writes best_model.pt, the step-1
    snapshot and last.pt) hits a full disk; one line, exit 1, and the step-1 checkpoints stay
    loadable for --resume."""
    monkeypatch.setitem(M.PRESETS, "mini", (32, 2, 1))
    rec = DATA / "fsdd" / "recordings"
    manifest = tmp_path / "m.tsv"
    manifest.write_text("path\ttext\n" + "".join(f"{rec / f'{d}_jackson_5.wav'}\t{w}\n"
                                                  for d, w in enumerate(["zero", "one", "two"])))
    real, calls = torch.save, []

    def full_on_fourth(obj, f):
        calls.append(1)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f)

    monkeypatch.setattr(torch, "save", full_on_fourth)
    out = tmp_path / "out"
    rc = train_cli.main(["--local-data-dir", str(manifest), "--dev-split", "train", "--language", "en",
                         "--whisper-size", "mini", "--max-steps", "3", "--eval-every", "1", "--train-batch-size", "3",
                         "--max-batch-seconds", "none", "--num-workers", "0", "--no-progress", "--max-eval-utts", "1",
                         "--output-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("train.py: error: could not write the checkpoint " + str(out))
    assert "the disk is full" in err[-1]
    monkeypatch.setattr(torch, "save", real)
    assert load_checkpoint(out / "last.pt")["state"]["step"] == 1
    assert not [p for p in out.iterdir() if p.suffix == ".tmp"]


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".last.pt.{dead}.abc123.tmp"
    alive = tmp_path / f".last.pt.{os.getpid()}.def456.tmp"
    other = tmp_path / ".notes.tmp"
    for p in (stale, alive, other):
        p.write_bytes(b"partial")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and alive.exists() and other.exists()


def test_train_py_resume_from_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "last.pt").write_text("hello\n")
    rc = train_cli.main(["--local-data-dir", str(tmp_path / "unused.tsv"), "--output-dir", str(tmp_path), "--resume"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == f"train.py: error: {tmp_path / 'last.pt'}: a text file (starting 'hello'), not a " \
                              f"checkpoint: use a checkpoint written by train.py (OUT/best_model.pt or OUT/last.pt)"
