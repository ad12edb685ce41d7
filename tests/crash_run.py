"""Run train.py, and SIGKILL it at a named point, for tests/test_crash.py:

    python tests/crash_run.py POINT N [train.py flags...]

POINT is where the process kills itself, the N-th time it gets there (counted from 1 in this
process; N = 0 never kills):
  step  inside an optimizer step: after backward, before the gradient clip and the weight update
  eval  inside a dev evaluation: after its first decoded clip, before the scores exist
  save  inside a checkpoint write: half of the file's bytes on disk, not yet renamed into place
  last  the same, counting only the writes of last.pt (how many other files a step writes, such
        as best_model.pt, depends on the dev scores)

The points are hooks on the functions train.py really calls (nothing in the package knows about
them); the kill is a real SIGKILL, so no handler, finally or atexit runs. The "mini" preset is
shrunk to tiny dims so each process trains in about a second.
"""
import io
import os
import runpy
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _counting(n: int):
    calls = [0]

    def reached() -> bool:
        calls[0] += 1
        return calls[0] == n
    return reached


def hook_step(reached) -> None:
    import torch
    real = torch.nn.utils.clip_grad_norm_

    def clip(*args, **kw):
        if reached():
            _die()
        return real(*args, **kw)
    torch.nn.utils.clip_grad_norm_ = clip


def hook_eval(reached) -> None:
    from whisper_scratch import evaluation
    real = evaluation.transcribe_files

    def transcribe_files(*args, **kw):
        kill = reached()
        for i, item in enumerate(real(*args, **kw)):
            if kill and i == 1:
                _die()
            yield item
    evaluation.transcribe_files = transcribe_files


def hook_save(reached, prefix: str = "") -> None:
    import torch
    real = torch.save

    def name(f) -> str:  # atomic_save writes through os.fdopen: the name is a descriptor
        n = getattr(f, "name", f)
        return os.path.basename(os.readlink(f"/proc/self/fd/{n}") if isinstance(n, int) else str(n))

    def save(obj, f, *args, **kw):
        if not name(f).startswith(prefix) or not reached():
            return real(obj, f, *args, **kw)
        buf = io.BytesIO()
        real(obj, buf, *args, **kw)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        _die()
    torch.save = save


HOOKS = {"step": hook_step, "eval": hook_eval, "save": hook_save,
         "last": lambda reached: hook_save(reached, ".last.pt.")}


def main() -> None:
    point, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    sys.path.insert(0, str(REPO))
    from whisper_scratch import model
    model.PRESETS["mini"] = (32, 2, 1)
    if n > 0:
        HOOKS[point](_counting(n))
    sys.argv = [str(REPO / "train.py"), *argv]
    runpy.run_path(str(REPO / "train.py"), run_name="__main__")


if __name__ == "__main__":
    main()
