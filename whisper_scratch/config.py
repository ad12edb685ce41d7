"""CLI flags generated from an options dataclass: one source of truth for names, types, defaults
and help. Each field `foo_bar` is accepted as --foo-bar and --foo_bar."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Optional, Sequence, Type, TypeVar

T = TypeVar("T")


def _base_type(tp):
    """Optional[int] -> (int, True); int -> (int, False)."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def add_options(parser: argparse.ArgumentParser, cls: Type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, optional = _base_type(hints[f.name])
        names = [f"--{f.name.replace('_', '-')}"]
        if "_" in f.name:
            names.append(f"--{f.name}")
        names += list(f.metadata.get("aliases", ()))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
        kw = dict(dest=f.name, default=default, help=f.metadata.get("help", "") + f" (default: {default!r})")
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = (lambda s, _t=tp: None if s.lower() in ("none", "") else _t(s)) if optional else tp
            kw["metavar"] = f.name.upper()
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        parser.add_argument(*names, **kw)


def parse_options(cls: Type[T], argv: Optional[Sequence[str]] = None, description: str = "") -> T:
    """Parse argv into a `cls` instance; the dataclass's own __post_init__ validates values."""
    parser = argparse.ArgumentParser(description=description or cls.__doc__)
    add_options(parser, cls)
    ns = parser.parse_args(argv)
    try:
        return cls(**vars(ns))
    except (ValueError, TypeError) as e:
        parser.error(str(e))
