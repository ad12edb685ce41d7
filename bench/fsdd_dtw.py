"""A classic reference for FSDD's folds: dynamic time warping against every training clip.

    python bench/fsdd_dtw.py [--folds george nicolas jackson theo yweweler official] [--k 5] [--threads 2]

What a speaker-independent recognizer of the 1970s-80s would do with the same clips: each clip
becomes MFCC-like features (our log-mel, mean-normalised over the clip, 12 cepstra without c0 and
their deltas, 20 ms frames, the quiet edges trimmed), and a test clip takes the word of its k
nearest training clips by length-normalised DTW distance (votes weighted 1/rank). The folds are
bench/fsdd_folds.py's (split_of): train on the "train" split only, test on the same clips.

It needs no training, so it separates what the data allows from what our model learns: if the
template matcher does no better on an unseen voice than the neural model, four voices are the
limit, not the recipe. Prints each fold's WER, its most frequent confusions, the mean over the
speaker folds and the worst one.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from fsdd_folds import SPEAKERS, split_of  # noqa: E402
from whisper_scratch.audio import load_audio, log_mel_spectrogram  # noqa: E402

N_CEPSTRA = 13  # c0 .. c12; c0 (the level) is dropped after the mean normalisation


def features(path: Path, n_mels: int = 80) -> torch.Tensor:
    """(frames, 24): cepstra c1..c12 and their deltas, 20 ms apart, edges below peak - 15 dB cut."""
    mel = log_mel_spectrogram(torch.from_numpy(load_audio(path)), n_mels)[:, :-1]
    energy = mel.mean(0)
    loud = (energy > energy.max() - 1.5).nonzero().flatten()  # log10 units: 1.5 = 15 dB
    mel = mel[:, loud[0]: loud[-1] + 1]
    k = torch.arange(N_CEPSTRA)[:, None]
    dct = torch.cos(torch.pi / n_mels * (torch.arange(n_mels)[None] + 0.5) * k)
    c = dct @ mel
    c = (c - c.mean(1, keepdim=True))[1:]
    delta = torch.zeros_like(c)
    delta[:, 1:-1] = (c[:, 2:] - c[:, :-2]) / 2
    return torch.cat([c, delta]).T[::2].contiguous()


def padded(xs: list) -> tuple:
    out = torch.zeros(len(xs), max(len(x) for x in xs), xs[0].shape[1])
    for i, x in enumerate(xs):
        out[i, :len(x)] = x
    return out, torch.tensor([len(x) for x in xs])


def dtw_distances(query: torch.Tensor, refs: torch.Tensor, ref_lens: torch.Tensor) -> torch.Tensor:
    """Length-normalised DTW distance of query (T, d) to every padded reference (N, T', d):
    D[i, j] = cost[i, j] + min(D[i-1, j], D[i-1, j-1], D[i, j-1]). Padding columns lie right of
    each reference's end, and the recursion only moves right, so they never reach it."""
    cost = torch.cdist(query[None].expand(len(refs), -1, -1), refs)  # (N, T, T')
    n, t_q, t_r = cost.shape
    prev = torch.full((n, t_r + 1), float("inf"))
    prev[:, 0] = 0.0
    for i in range(t_q):
        down = torch.minimum(prev[:, 1:], prev[:, :-1]) + cost[:, i]  # from above or the diagonal
        row = torch.full((n, t_r + 1), float("inf"))
        run = row[:, 0]
        for j in range(t_r):  # from the left: a running minimum along the row
            run = torch.minimum(down[:, j], run + cost[:, i, j])
            row[:, j + 1] = run
        prev = row
    return prev[torch.arange(n), ref_lens] / (t_q + ref_lens)


def run_fold(fold: str, clips: list, feats: list, k: int) -> tuple:
    split = [split_of(fold, c["speaker"], c["take"]) for c in clips]
    train = [i for i, s in enumerate(split) if s == "train"]
    test = [i for i, s in enumerate(split) if s == "test"]
    refs, ref_lens = padded([feats[i] for i in train])
    wrong, confusions = 0, {}
    for i in test:
        votes = {}
        for rank, j in enumerate(dtw_distances(feats[i], refs, ref_lens).topk(k, largest=False).indices.tolist()):
            word = clips[train[j]]["text"]
            votes[word] = votes.get(word, 0.0) + 1.0 / (rank + 1)
        hyp = max(votes, key=votes.get)
        if hyp != clips[i]["text"]:
            wrong += 1
            pair = f"{clips[i]['text']} -> {hyp}"
            confusions[pair] = confusions.get(pair, 0) + 1
    return 100.0 * wrong / len(test), len(train), len(test), sorted(confusions.items(), key=lambda x: -x[1])[:3]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fsdd", default=str(ROOT.parent / "shared/data/fsdd"))
    ap.add_argument("--folds", nargs="+", default=[*SPEAKERS, "official"])
    ap.add_argument("--k", type=int, default=5, help="neighbours that vote")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    unknown = set(args.folds) - {*SPEAKERS, "official"}
    if unknown:
        raise SystemExit(f"--folds: unknown {sorted(unknown)}; choose from {[*SPEAKERS, 'official']}")
    torch.set_num_threads(args.threads)
    fsdd = Path(args.fsdd)
    if not (fsdd / "manifest.tsv").is_file():
        raise SystemExit(f"error: --fsdd {fsdd}: no manifest.tsv (FSDD as ../shared/data/fsdd lays it out)")
    with open(fsdd / "manifest.tsv", newline="") as f:
        clips = [{**r, "take": int(Path(r["path"]).stem.rsplit("_", 1)[1])} for r in csv.DictReader(f, delimiter="\t")]
    feats = [features(fsdd / c["path"]) for c in clips]
    print("| fold | train | test | test WER % | most frequent confusions | seconds |\n|---|---|---|---|---|---|")
    wers = {}
    for fold in args.folds:
        start = time.time()
        wer, n_train, n_test, top = run_fold(fold, clips, feats, args.k)
        wers[fold] = wer
        said = ", ".join(f"{pair} {n}" for pair, n in top)
        print(f"| {fold} | {n_train} | {n_test} | {wer:.1f} | {said} | {time.time() - start:.0f} |", flush=True)
    speakers = [f for f in args.folds if f in SPEAKERS]
    if speakers:
        worst = max(speakers, key=wers.get)
        print(f"speaker folds: mean WER {sum(wers[f] for f in speakers) / len(speakers):.1f} % over "
              f"{len(speakers)}, worst {worst} {wers[worst]:.1f} %")


if __name__ == "__main__":
    main()
