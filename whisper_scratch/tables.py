"""Reading the text tables corpora come in: tab-separated files (with or without CSV quoting) and
JSON lines. Every problem is a ValueError that names the file and the line; nothing from inside
csv or json escapes. A leaf module: it imports nothing from the package.

CSV quoting is detected per file. Common Voice 6.1 wrote its TSVs with it (a sentence holding `"`
is wrapped in quotes, inner quotes doubled: `"He saw cinema as ""plastic art in motion""."`);
later releases and most hand-made manifests write `"` bare (`"One" he said`). A file is read
with quoting when every field that holds a `"` is such a wrapped field, and at least one does.
"""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import List, Tuple

_QUOTED_FIELD = re.compile(r'"(?:[^"]|"")*"')
_LINE_END = re.compile(r"\r\n|\r|\n")  # csv's line ends; str.splitlines also splits at \x0c, U+2028, ...
_BOM = "\ufeff"


class TableError(ValueError):
    """A table that cannot be read; the message starts with `file:line:`."""


def read_text(path: Path) -> str:
    """The file as text: UTF-8, a leading byte-order mark dropped; anything else is a TableError
    naming the line and byte. (Whole-file: a Common Voice validated.tsv is at most a few 100 MB.)"""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise TableError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as "
                         f"UTF-8") from None


def uses_csv_quoting(text: str) -> bool:
    """True when the table was written with CSV quoting (see the module docstring)."""
    quoted = False
    for line in _LINE_END.split(text):
        if '"' not in line:
            continue
        for field in line.split("\t"):
            if '"' in field:
                if not _QUOTED_FIELD.fullmatch(field):
                    return False
                quoted = True
    return quoted


def read_tsv_rows(path: Path) -> List[List[str]]:
    """Every row of a TSV as a list of fields (the header too), quoting detected per file."""
    path = Path(path)
    text = read_text(path)
    quoting = csv.QUOTE_MINIMAL if uses_csv_quoting(text) else csv.QUOTE_NONE
    # newline="": csv sees the line ends as written, so \r\n and quoted newlines are its to read
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=quoting, strict=True)
    try:
        return list(reader)
    except csv.Error as e:  # a bad quote, an over-long field
        raise TableError(f"{path}:{reader.line_num}: not a readable TSV row ({e})") from None


def read_tsv(path: Path) -> Tuple[List[str], List[Tuple[int, dict]]]:
    """(header, [(line number, {column: value})]) of a header TSV. A short row leaves its missing
    columns out of its dict; a long row's extra fields are dropped (Common Voice adds columns)."""
    rows = read_tsv_rows(path)
    if not rows or not any(f.strip() for f in rows[0]):
        raise TableError(f"{path}:1: empty file, expected a header line")
    header = [h.strip().lstrip(_BOM) for h in rows[0]]
    out = []
    for lineno, row in enumerate(rows[1:], start=2):
        if not "".join(row).strip():
            continue  # blank line
        out.append((lineno, dict(zip(header, row))))
    return header, out


def read_jsonl(path: Path) -> Tuple[List[Tuple[int, dict]], List[Tuple[int, str]]]:
    """([(line number, object)], [(line number, why unreadable)]) of a JSON-lines file. Lines are
    split at \\n only: a JSON string may hold U+2028 or other characters str.splitlines splits at."""
    path = Path(path)
    rows, bad = [], []
    for lineno, line in enumerate(read_text(path).split("\n"), start=1):
        line = line.strip().lstrip(_BOM)
        if not line:
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nesting deeper than Python's stack
            bad.append((lineno, getattr(e, "msg", "nested too deeply")))
            continue
        if isinstance(obj, dict):
            rows.append((lineno, obj))
        else:
            bad.append((lineno, f"a JSON {type(obj).__name__}, not an object"))
    return rows, bad
