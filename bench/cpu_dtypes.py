"""Which weight format makes CPU decoding fastest: greedy decoding of one clip and of a batch of 16
(5 s each, 64 tokens, the `tiny` random model of bench/decode.py), best of --repeats, each format
in turn within one command:

- fp32: the weights as trained;
- fp32 + bf16 autocast: what `--dtype bf16` does (torch casts the fp32 weights at every call);
- bf16 weights: a copy with every weight stored in bfloat16 except the LayerNorms (which
  normalise in fp32), activations in bf16, logits fp32: half the bytes per decoder step;
- int8: `--quantize int8` (torch's dynamic quantisation of every nn.Linear).

The decoder step at batch 1 is memory-bound (bench/RESULTS.md), so fewer bytes per weight should
win there; the script prints each time and its ratio to fp32, and whether the first tokens agree.

    python bench/cpu_dtypes.py [--threads 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import random_model  # noqa: E402  (bench/decode.py)
from whisper_scratch.checkpoint import quantize  # noqa: E402
from whisper_scratch.decoding import DecodingOptions, decode  # noqa: E402
from whisper_scratch.model import LayerNorm  # noqa: E402


def bf16_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A copy with bf16 weights and fp32 LayerNorms (decoding.encode casts the mel to the conv's dtype)."""
    low = copy.deepcopy(model).to(torch.bfloat16)
    for module in low.modules():
        if isinstance(module, LayerNorm):
            module.float()
    return low


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok, model = random_model("tiny", 2)
    formats = [("fp32", model, False), ("fp32 + bf16 autocast (--dtype bf16)", model, True),
               ("bf16 weights", bf16_weights(model), False), ("int8 (--quantize int8)", quantize(model, "int8", "cpu"), False)]
    opts = DecodingOptions(beam_size=1, max_new_tokens=args.max_new_tokens, loop_span=0)
    print(f"tiny random model, greedy, {args.max_new_tokens} tokens, 5 s clips, {args.threads} threads, "
          f"best of {args.repeats}; torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}\n")
    print("| batch | format | seconds | fp32 / this | first 8 tokens as fp32 |")
    print("|---|---|---|---|---|")
    for batch in (1, 16):
        mel, lens = torch.randn(batch, 80, 500), torch.full((batch,), 500)
        best, tokens = {}, {}
        for _ in range(args.repeats):  # formats take turns, so a slow spell hits each of them
            for name, m, autocast in formats:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    decode(m, mel, lens, tok, opts)  # warm-up of this shape
                    t = time.perf_counter()
                    result = decode(m, mel, lens, tok, opts)
                    best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
                tokens[name] = [r.tokens[:8] for r in result]
        for name, _, _ in formats:
            same = sum(a == b for a, b in zip(tokens[name], tokens["fp32"]))
            print(f"| {batch} | {name} | {best[name]:.3f} | {best['fp32'] / best[name]:.2f}× | {same}/{batch} |")


if __name__ == "__main__":
    main()
