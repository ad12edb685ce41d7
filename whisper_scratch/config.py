"""Options dataclass -> command line: the one place that turns fields into flags.

Every entry point (train.py, transcribe.py, synth, data, export) declares a frozen dataclass whose
fields are made with `option(...)`; `parse_options` generates the flags, parses argv and builds
the dataclass, whose own __post_init__ rejects bad values. Field `foo_bar` is --foo-bar and
--foo_bar. A field with no default is a required flag. A field whose type is itself an options
dataclass (TranscribeOptions.decoding: DecodingOptions) contributes its fields as flags of their
own, so a new decoding option is one line in DecodingOptions and appears in every CLI that nests it.
A leaf module: it imports nothing from the package.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Optional, Sequence, Type, TypeVar

T = TypeVar("T")


def option(default=dataclasses.MISSING, help: str = "", *, factory=None, cli: bool = True, **meta):
    """A dataclass field with its flag's help text. No default: the flag is required. `factory`:
    a default_factory (nested options). cli=False: a library-only field, never a flag. Extra
    metadata: choices=(...), aliases=("--x",), positional=True (a required positional argument),
    nargs="+" or "*" (a Tuple[str, ...] field taking several values)."""
    metadata = {"help": help, "cli": cli, **meta}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _base_type(tp):
    """Optional[int] -> (int, True); int -> (int, False)."""
    if typing.get_origin(tp) in (typing.Union, getattr(types, "UnionType", typing.Union)):  # Optional[X], X | None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _cli_fields(cls: Type, defaults=None):
    """(field, type, default) for every flag of `cls`, nested options dataclasses flattened; a
    nested field's default is the one the outer dataclass's default instance carries."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or not f.metadata.get("cli", True):
            continue
        default = getattr(defaults, f.name) if defaults is not None else _default(f)
        tp, _ = _base_type(hints[f.name])
        if dataclasses.is_dataclass(tp):
            yield from _cli_fields(tp, default if default is not dataclasses.MISSING else None)
        else:
            yield f, hints[f.name], default


def _parse_value(tp, optional: bool):
    def parse(s: str):
        if optional and s.lower() in ("none", ""):
            return None
        return tp(s)
    parse.__name__ = getattr(tp, "__name__", "value")  # argparse names the type in its errors
    return parse


TRUE, FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


class _BoolAction(argparse.BooleanOptionalAction):
    """--x and --no-x, and also openai-whisper's spelling --x true|false (--vad false)."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, **kw)
        self.nargs, self.metavar = "?", "BOOL"

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string.startswith("--no-") or values is None:
            if values is not None:
                parser.error(f"{option_string} takes no value, got {values!r}")
            return super().__call__(parser, namespace, values, option_string)
        if values.lower() not in TRUE + FALSE:
            parser.error(f"{option_string}: expected true or false, got {values!r}")
        setattr(namespace, self.dest, values.lower() in TRUE)


def add_options(parser: argparse.ArgumentParser, cls: Type) -> None:
    seen: dict = {}
    for f, hint, default in _cli_fields(cls):
        if f.name in seen:
            raise TypeError(f"{cls.__name__}: flag --{f.name} is declared twice ({seen[f.name]} and {f})")
        seen[f.name] = f
        tp, optional = _base_type(hint)
        names = [*f.metadata.get("aliases", ()), flag(f.name)]
        if "_" in f.name:
            names.append(f"--{f.name}")
        required = default is dataclasses.MISSING
        if f.metadata.get("positional"):  # e.g. `python -m whisper_scratch.data SOURCE`
            parser.add_argument(f.name, type=_parse_value(tp, optional), help=f.metadata.get("help", ""))
            continue
        kw = dict(dest=f.name, help=f.metadata.get("help", "") + ("" if required else f" (default: {default!r})"))
        if tp is bool:
            kw.update(action=_BoolAction, default=None if required else default)
        elif "nargs" in f.metadata:  # a Tuple[str, ...] field: --exclude a.tsv b.tsv
            kw.update(nargs=f.metadata["nargs"], type=str, metavar=f.name.upper(), required=required,
                      default=None if required else default)
        else:
            kw.update(type=_parse_value(tp, optional), metavar=f.name.upper(), required=required,
                      default=None if required else default)
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        parser.add_argument(*names, **kw)


def build_options(cls: Type[T], values: dict) -> T:
    """`cls` from flat flag values, building each nested options dataclass from its own fields."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init or not f.metadata.get("cli", True):
            continue
        tp, _ = _base_type(hints[f.name])
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = build_options(tp, values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def parse_options(cls: Type[T], argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> T:
    """Parse argv into a `cls` instance; a ValueError from the dataclass's validation becomes a
    usage error (exit status 2) that quotes it."""
    parser = argparse.ArgumentParser(prog=prog, description=cls.__doc__)
    add_options(parser, cls)
    ns = parser.parse_args(argv)
    try:
        return build_options(cls, vars(ns))
    except (ValueError, TypeError) as e:
        parser.error(str(e))


def require(ok: bool, message: str) -> None:
    """Options validation: a ValueError with the message (parse_options turns it into a usage error)."""
    if not ok:
        raise ValueError(message)


def output_problem(flag_name: str, path, kind: str = "file") -> Optional[str]:
    """What stops an output `path` (kind "file" or "folder") from being written later, checked
    without creating anything: a folder where a file goes or the reverse, a file on the way, a
    folder nobody may write in. None when nothing does. For checks before long work."""
    path = Path(path)
    if kind == "file" and path.is_dir():
        return f"{flag_name} {path}: is a folder; give a file name"
    if kind == "folder" and path.exists() and not path.is_dir():
        return f"{flag_name} {path}: exists and is not a folder"
    chain = (path, *path.parents)
    broken = next((p for p in chain if p.is_symlink() and not p.exists()), None)
    if broken:
        return f"{flag_name} {path}: {broken} is a broken symbolic link"
    existing = next(p for p in (path.parent if kind == "file" else path, *path.parents) if p.exists())
    if not existing.is_dir():
        return f"{flag_name} {path}: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{flag_name} {path}: cannot write in {existing}"
    return None


def flag(name: str) -> str:
    """How a message names a field's flag: --foo-bar."""
    return "--" + name.replace("_", "-")


# One spelling of a precision for every entry point: fp16 and float16 are the same flag value.
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16",
                 "float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def canonical_dtype(name: Optional[str], flag_name: str = "--dtype") -> Optional[str]:
    """'fp16' / 'float16' -> 'float16' (torch's name); None stays None; anything else is an error."""
    if name is None:
        return None
    if name not in DTYPE_ALIASES:
        raise ValueError(f"{flag_name} must be one of {', '.join(DTYPE_ALIASES)}, got {name!r}")
    return DTYPE_ALIASES[name]
