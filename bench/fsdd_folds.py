"""FSDD accuracy, measured: the official split and every leave-one-speaker-out fold.

    python bench/fsdd_folds.py [--folds official george ...] [--out exp/fsdd] [--threads 2] -- TRAIN FLAGS

Each fold gets its own manifest (train / dev / test) under OUT/FOLD/: the official split tests on
recordings 0-4 of every speaker and digit (FSDD's README); a speaker fold tests on all 500 clips
of that speaker and trains on the other four. In both, recordings 5-7 of the training speakers
are the dev split (best_model.pt is picked on them), so the test clips never steer training.
`one-SPEAKER` is the tiny-corpus case: 30 clips of one speaker (recordings 0-2) to train on,
recordings 3-12 as dev and 13-49 as test. The
test split is decoded with transcribe.py --mode evaluate and the table gives WER/CER per fold,
the mean over the speaker folds and the worst one. Flags after `--` go to train.py.

`--espeak-voices N` adds the ten digit words spoken by N espeak-ng voices (synth.build_digits,
8 kHz like FSDD) to every fold's train split, never to dev or test: four real speakers are few
to learn a voice-independent model from, and synthetic voices are data the project makes itself.
`--common-voice DIR` adds a Common Voice folder's validated clips (e.g. shared/data/cv_sample/en:
100 English sentences by 95 real speakers) to every train split the same way: real voices and
microphones, though not the digit words. `--pretrain DIR [DIR ...]` trains one model first on
the validated clips of those Common Voice folders (e.g. all six of shared/data/cv_sample: about
210 real voices in six languages), band-limited to FSDD's 8 kHz, and starts every fold from its
encoder (train.py --init-from); `--pretrain-steps` sets its length. `--synthetic-noise N` trains
with N recordings of noise of every colour mixed in (the speakers' own noise floors are otherwise
a cue to who speaks)."""
import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from whisper_scratch.synth import build_digits, build_noise  # noqa: E402

SPEAKERS = ("george", "jackson", "nicolas", "theo", "yweweler")
DEV_TAKES = range(5, 8)


def split_of(fold: str, speaker: str, take: int) -> str:
    if fold.startswith("one-"):
        if speaker != fold[4:]:
            return "unused"
        return "train" if take < 3 else "dev" if take < 13 else "test"
    if fold == "official":
        return "test" if take < 5 else "dev" if take in DEV_TAKES else "train"
    if speaker == fold:
        return "test"
    return "dev" if take in DEV_TAKES else "train"


def write_fold(fsdd: Path, fold: str, out: Path, extra_train: list = ()) -> tuple:
    """OUT/manifest.tsv (train and dev rows, audio paths absolute) and OUT/test.tsv (path, text).
    extra_train: more train rows (dicts with absolute path, duration, text, speaker)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(fsdd / "manifest.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or {"path", "text", "speaker"} - set(rows[0]):
        raise SystemExit(f"{fsdd}/manifest.tsv: expected columns path, text, speaker")
    manifest, test = out / "manifest.tsv", out / "test.tsv"
    counts = {"train": 0, "dev": 0, "test": 0, "unused": 0}
    with open(manifest, "w") as m, open(test, "w") as t:
        m.write("path\tduration\ttext\tspeaker\tsplit\n")
        t.write("path\ttext\n")
        for r in rows:
            take = int(Path(r["path"]).stem.rsplit("_", 1)[1])
            split = split_of(fold, r["speaker"], take)
            counts[split] += 1
            audio = (fsdd / r["path"]).resolve()
            if split == "unused":
                continue
            if split == "test":
                t.write(f"{audio}\t{r['text']}\n")
            else:
                m.write(f"{audio}\t{r['duration']}\t{r['text']}\t{r['speaker']}\t{split}\n")
        for r in extra_train:
            m.write(f"{r['path']}\t{r['duration']}\t{r['text']}\t{r['speaker']}\ttrain\n")
    counts["train"] += len(extra_train)
    return manifest, test, counts


def espeak_rows(out: Path, voices: int) -> list:
    """Train rows of the synthetic digits (built once under OUT/espeak_digits_N)."""
    if not voices:
        return []
    manifest = build_digits(out / f"espeak_digits_{voices}", voices)
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [{**r, "path": str((manifest.parent / r["path"]).resolve())} for r in rows]


def common_voice_rows(folder: Optional[str]) -> list:
    """Train rows of a Common Voice folder's validated.tsv (CSV quoting, as the corpus writes it)."""
    if not folder:
        return []
    from whisper_scratch.audio import audio_duration
    root = Path(folder).resolve()
    with open(root / "validated.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [{"path": str(root / "clips" / r["path"]), "duration": f"{audio_duration(root / 'clips' / r['path']):.3f}",
             "text": r["sentence"].replace("\t", " "), "speaker": "cv_" + r["client_id"][:12]} for r in rows]


def band_limited_common_voice(folders: list, out: Path) -> Path:
    """A manifest of the folders' validated clips resampled to 8 kHz like FSDD (built once under
    OUT): a model pretrained on them hears the same band as the digits. Every 20th clip is dev."""
    import soundfile as sf
    from whisper_scratch.audio import load_audio
    manifest = out / "manifest.tsv"
    if manifest.is_file():
        return manifest
    (out / "clips").mkdir(parents=True, exist_ok=True)
    lines = ["path\tduration\ttext\tspeaker\tsplit\n"]
    for folder in folders:
        for i, r in enumerate(common_voice_rows(folder)):
            audio = load_audio(r["path"], 8000)
            name = f"clips/{Path(folder).name}_{Path(r['path']).stem}.wav"
            sf.write(out / name, audio, 8000, subtype="PCM_16")
            lines.append(f"{name}\t{len(audio) / 8000:.3f}\t{r['text']}\t{r['speaker']}\t{'dev' if i % 20 == 0 else 'train'}\n")
    manifest.with_suffix(".tmp").write_text("".join(lines))
    manifest.with_suffix(".tmp").rename(manifest)  # a half-built corpus is never taken for a whole one
    return manifest


def pretrain(folders: list, out: Path, train_flags: list, steps: int, threads: int) -> Path:
    """Train once on Common Voice (the folds' flags; longer batches, a longer warm-up, more weight on
    the encoder's CTC loss, `steps` steps) and return the checkpoint every fold starts from. Its
    text is another language's: only the encoder is passed on (train.py --init-from), the folds
    train their decoder anew."""
    manifest = band_limited_common_voice(folders, out / "corpus")
    best = out / "best_model.pt"
    if not best.is_file():
        cmd = [sys.executable, str(ROOT / "train.py"), "--local-data-dir", str(manifest), "--train-split", "train",
               "--dev-split", "dev", "--language", "ru", "--output-dir", str(out), *train_flags,
               "--max-batch-seconds", "60", "--ctc-weight", "0.5", "--warmup-steps", "200",
               "--max-steps", str(steps), "--eval-every", str(max(1, steps // 3))]
        with open(out / "train.log", "a") as log:
            subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)), stdout=log,
                           stderr=subprocess.STDOUT)
    return best


def run_fold(fsdd: Path, fold: str, out: Path, train_flags: list, threads: int, checkpoints: list,
             extra_train: list = ()) -> list:
    manifest, test, counts = write_fold(fsdd, fold, out, extra_train)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    log = open(out / "train.log", "a")
    train = [sys.executable, str(ROOT / "train.py"), "--local-data-dir", str(manifest), "--train-split", "train",
             "--dev-split", "dev", "--language", "en", "--output-dir", str(out)]
    if (out / "last.pt").is_file():
        train.append("--resume")
    subprocess.run(train + train_flags, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    results = []
    for name in checkpoints:
        path = out / name
        if name.startswith("avg-best-") or name.startswith("avg-last-"):  # avg-last-N.pt: the newest N snapshots
            how, n = name[4:8], name[9:].removesuffix(".pt")
            subprocess.run([sys.executable, "-m", "whisper_scratch.average", "--dir", str(out), f"--{how}", n,
                            "--output", str(path)], check=True, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        if not path.is_file():
            raise SystemExit(f"{path}: no such checkpoint (train with --ema-decay for ema.pt, --keep-checkpoints for avg-*)")
        evaluated = out / f"test_{path.stem}"
        subprocess.run([sys.executable, str(ROOT / "transcribe.py"), "--model_path", str(path), "--mode", "evaluate",
                        "--audio_dir", str(fsdd), "--reference_file", str(test), "--output_dir", str(evaluated),
                        "--batch_size", "64", "--beam_size", "4", "--ctc_weight", "0.3", "--language", "en",
                        "--temperature_increment_on_fallback", "none"],
                       check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
        report = json.loads((evaluated / "evaluation.json").read_text())
        results.append({"fold": fold, "checkpoint": name, **counts, "wer": 100 * report["wer"], "cer": 100 * report["cer"]})
    return results


def dev_curve(out: Path) -> str:
    """The dev WER at each evaluation of the run (metrics.csv), to show how stable training was."""
    with open(out / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("dev_wer")]
    return " -> ".join(f"{100 * float(r['dev_wer']):.0f}" for r in rows)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    train_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fsdd", default=str(ROOT.parent / "shared" / "data" / "fsdd"))
    p.add_argument("--folds", nargs="+", default=["official", *SPEAKERS], choices=["official", *SPEAKERS, *(f"one-{s}" for s in SPEAKERS)])
    p.add_argument("--out", default="exp/fsdd")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoints", nargs="+", default=["best_model.pt"],
                   help="which files of each fold are tested: best_model.pt, last.pt, best_ema.pt, avg-last-N.pt, ...")
    p.add_argument("--espeak-voices", type=int, default=0,
                   help="add the digits spoken by this many espeak-ng voices to every fold's train split")
    p.add_argument("--synthetic-noise", type=int, default=0,
                   help="build this many noise recordings of every colour (synth.build_noise) under OUT/noise and "
                        "train with --noise-dir on them")
    p.add_argument("--common-voice", default=None,
                   help="add this Common Voice folder's validated clips to every fold's train split")
    p.add_argument("--pretrain", nargs="+", default=None, metavar="DIR",
                   help="first train one model on these Common Voice folders' clips (8 kHz) and start every fold "
                        "from its encoder")
    p.add_argument("--pretrain-steps", type=int, default=3000)
    a = p.parse_args(argv)
    if not (Path(a.fsdd) / "manifest.tsv").is_file():
        raise SystemExit(f"error: --fsdd {a.fsdd}: no manifest.tsv (FSDD as ../shared/data/fsdd lays it out)")
    if a.pretrain:
        train_flags += ["--init-from", str(pretrain(a.pretrain, Path(a.out).resolve() / "pretrain", train_flags,
                                                    a.pretrain_steps, a.threads))]
    extra = espeak_rows(Path(a.out), a.espeak_voices) + common_voice_rows(a.common_voice)
    if a.synthetic_noise:
        train_flags += ["--noise-dir", str(build_noise(Path(a.out).resolve() / "noise", a.synthetic_noise))]
    results = [r for fold in a.folds
               for r in run_fold(Path(a.fsdd), fold, Path(a.out) / fold, train_flags, a.threads, a.checkpoints,
                                 extra)]
    print("train.py " + " ".join(train_flags))
    print("| fold | checkpoint | train | dev | test | test WER % | test CER % | dev WER % per evaluation |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['fold']} | {r['checkpoint']} | {r['train']} | {r['dev']} | {r['test']} | {r['wer']:.2f} | "
              f"{r['cer']:.2f} | {dev_curve(Path(a.out) / r['fold'])} |")
    for name in a.checkpoints:
        folds = [r for r in results if r["fold"] in SPEAKERS and r["checkpoint"] == name]
        if folds:
            worst = max(folds, key=lambda r: r["wer"])
            print(f"speaker folds, {name}: mean WER {sum(r['wer'] for r in folds) / len(folds):.2f} % over "
                  f"{len(folds)}, worst {worst['fold']} {worst['wer']:.2f} %")


if __name__ == "__main__":
    main()
