"""Transcripts -> files: a `transcribe` result ({text, segments, ...}) written as txt, json, srt,
vtt or tsv, with openai-whisper's timestamp and cue conventions."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, List, Sequence, Union

OUTPUT_FORMATS = ("txt", "json", "srt", "vtt", "tsv")


def format_timestamp(seconds: float, decimal_marker: str = ".", always_include_hours: bool = True) -> str:
    """Seconds -> [HH:]MM:SS.mmm (SRT uses ',' as the decimal marker)."""
    if seconds < 0:
        raise ValueError(f"timestamp must be >= 0, got {seconds}")
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    hours = f"{h:02d}:" if always_include_hours or h else ""
    return f"{hours}{m:02d}:{s:02d}{decimal_marker}{ms:03d}"


def _cues(result: dict) -> Iterable[dict]:
    return (s for s in result["segments"] if s["text"].strip())


def to_srt(result: dict) -> str:
    return "".join(f"{i}\n{format_timestamp(s['start'], ',')} --> {format_timestamp(s['end'], ',')}\n"
                   f"{s['text'].strip()}\n\n" for i, s in enumerate(_cues(result), start=1))


def to_vtt(result: dict) -> str:
    return "WEBVTT\n\n" + "".join(f"{format_timestamp(s['start'])} --> {format_timestamp(s['end'])}\n"
                                  f"{s['text'].strip()}\n\n" for s in _cues(result))


def to_tsv(result: dict) -> str:
    """openai-whisper's tsv: start and end in integer milliseconds."""
    rows = (f"{round(1000 * s['start'])}\t{round(1000 * s['end'])}\t{s['text'].strip()}\n" for s in _cues(result))
    return "start\tend\ttext\n" + "".join(rows)


def to_txt(result: dict) -> str:
    return result["text"] + "\n"


def to_json(result: dict) -> str:
    return json.dumps(result, ensure_ascii=False, indent=1) + "\n"


WRITERS = {"txt": to_txt, "json": to_json, "srt": to_srt, "vtt": to_vtt, "tsv": to_tsv}


def write_result(result: dict, stem: Union[str, Path], formats: Sequence[str]) -> List[Path]:
    """Write `result` as stem.<format> for each format ("all" = every one); returns the paths."""
    formats = OUTPUT_FORMATS if "all" in formats else formats
    written = []
    for fmt in formats:
        if fmt not in WRITERS:
            raise ValueError(f"output format must be one of {OUTPUT_FORMATS} or 'all', got {fmt!r}")
        path = Path(f"{stem}.{fmt}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(WRITERS[fmt](result), encoding="utf-8")
        written.append(path)
    return written
