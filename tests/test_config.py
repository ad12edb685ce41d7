"""config.py: options dataclasses -> flags (required, nested, positional), and every entry point's
rejection of combinations that would be silently ignored, with the bad value in the message."""
import re
from dataclasses import dataclass
from typing import Optional

import pytest

from whisper_scratch.config import canonical_dtype, option, parse_options
from whisper_scratch.trainer import TrainOptions


@dataclass(frozen=True)
class Inner:
    depth: int = option(3, "nested field")
    hidden: tuple = option((), "library only", cli=False)


@dataclass(frozen=True)
class Outer:
    source: str = option(help="positional", positional=True)
    name: str = option(help="required flag")
    inner: Inner = option(help="nested", factory=lambda: Inner(depth=5))
    verbose: bool = option(False, "a switch")
    limit: Optional[int] = option(None, "optional int")


def test_required_nested_and_positional_flags(capsys):
    o = parse_options(Outer, ["SRC", "--name", "x", "--depth", "7", "--verbose", "--limit", "none"])
    assert o == Outer("SRC", "x", Inner(depth=7), True, None)
    o = parse_options(Outer, ["SRC", "--name", "x"])
    assert o.inner == Inner(depth=5)  # the nested default comes from the outer default instance
    with pytest.raises(SystemExit):
        parse_options(Outer, ["SRC"])
    assert "the following arguments are required: --name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_options(Outer, ["SRC", "--name", "x", "--hidden", "1"])  # cli=False: not a flag
    assert "unrecognized arguments: --hidden" in capsys.readouterr().err


def test_one_dtype_spelling():
    assert canonical_dtype("fp16") == canonical_dtype("float16") == "float16"
    assert canonical_dtype(None) is None
    with pytest.raises(ValueError, match="got 'half'"):
        canonical_dtype("half")
    assert parse_options(TrainOptions, ["--dtype", "bfloat16"]).dtype == parse_options(TrainOptions, ["--dtype", "bf16"]).dtype


@pytest.mark.parametrize("argv, message", [
    (["--init-decoder"], "--init-decoder copies the decoder of --init-from's checkpoint"),
    (["--tokenizer", "bpe", "--keep-chars", "абв"], "--keep-chars 'абв' .* cannot be used with --tokenizer bpe"),
    (["--eval-ctc-weight", "0.3"], "--eval-ctc-weight needs a CTC head"),
])
def test_train_rejects_ignored_combinations(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_options(TrainOptions, argv)
    err = capsys.readouterr().err
    assert re.search(message, err), err


@pytest.mark.parametrize("argv, message", [
    (["--to", "openai", "--quantization", "int8"], "--quantization int8 applies to --to ct2 only, not --to openai"),
    (["--to", "hf", "--compact"], "--compact applies to --to ct2 only, not --to hf"),
])
def test_export_rejects_ignored_combinations(argv, message, capsys):
    from whisper_scratch.export.__main__ import ExportOptions
    with pytest.raises(SystemExit):
        parse_options(ExportOptions, ["--checkpoint", "a.pt", "--output", "out", *argv])
    assert message in capsys.readouterr().err
