"""The bench scripts' own arithmetic (their timings and accuracies are run by hand, never here)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from fsdd_dtw import dtw_distances, padded  # noqa: E402


def naive_dtw(a: torch.Tensor, b: torch.Tensor) -> float:
    inf = float("inf")
    D = [[inf] * (len(b) + 1) for _ in range(len(a) + 1)]
    D[0][0] = 0.0
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            D[i][j] = float((a[i - 1] - b[j - 1]).norm()) + min(D[i - 1][j], D[i - 1][j - 1], D[i][j - 1])
    return D[len(a)][len(b)] / (len(a) + len(b))


def test_batched_dtw_equals_the_textbook_recursion_on_padded_references():
    g = torch.Generator().manual_seed(0)
    query = torch.randn(7, 3, generator=g)
    refs = [torch.randn(n, 3, generator=g) for n in (1, 4, 9, 6)]
    batch, lens = padded(refs)
    got = dtw_distances(query, batch, lens)
    want = torch.tensor([naive_dtw(query, r) for r in refs])
    torch.testing.assert_close(got, want)
    # a reference warped in time (each frame twice) is nearer than a shuffled one
    near, far = query.repeat_interleave(2, 0), query[torch.randperm(7, generator=g)]
    batch, lens = padded([near, far])
    d = dtw_distances(query, batch, lens)
    assert d[0] < d[1]
