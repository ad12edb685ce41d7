"""Transcripts -> files: a `transcribe` result ({text, segments, ...}) written as txt, json, srt,
vtt or tsv, with openai-whisper's timestamp and cue conventions. With word timestamps, srt/vtt
cues can be cut at words (max_words per cue) and show the word being spoken underlined."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Union

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


def _segments(result: dict) -> Iterable[dict]:
    return (s for s in result["segments"] if s["text"].strip())


def _srt_text(text: str) -> str:
    return re.sub(r"-{2,}>", "->", text)  # the one sequence that would end a cue's text (and ---> holds one)


def _vtt_text(text: str) -> str:
    """WebVTT cue text: & and < are markup there (and > after --), so they are written as entities."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cues(result: dict, max_words: Optional[int] = None, highlight: bool = False,
          escape=lambda text: text) -> Iterator[tuple]:
    """(start, end, text) of each cue: a segment, or with its words known, groups of at most
    max_words words; highlight: one cue per word, its group shown with that word underlined
    (openai-whisper's --highlight_words). `escape` is applied to the transcript's text, not to
    the underline tags."""
    for s in _segments(result):
        words = s.get("words")
        if not words or (max_words is None and not highlight):
            yield s["start"], s["end"], escape(s["text"].strip())
            continue
        n = max_words or len(words)
        for group in (words[i:i + n] for i in range(0, len(words), n)):
            if not highlight:
                yield group[0]["start"], group[-1]["end"], escape(" ".join(w["word"] for w in group))
                continue
            for k, w in enumerate(group):
                text = " ".join(f"<u>{escape(x['word'])}</u>" if j == k else escape(x["word"])
                                for j, x in enumerate(group))
                yield w["start"], w["end"], text


def to_srt(result: dict, max_words: Optional[int] = None, highlight: bool = False) -> str:
    return "".join(f"{i}\n{format_timestamp(a, ',')} --> {format_timestamp(b, ',')}\n{text}\n\n"
                   for i, (a, b, text) in enumerate(_cues(result, max_words, highlight, _srt_text), start=1))


def to_vtt(result: dict, max_words: Optional[int] = None, highlight: bool = False) -> str:
    return "WEBVTT\n\n" + "".join(f"{format_timestamp(a)} --> {format_timestamp(b)}\n{text}\n\n"
                                  for a, b, text in _cues(result, max_words, highlight, _vtt_text))


def to_tsv(result: dict) -> str:
    """openai-whisper's tsv: start and end in integer milliseconds."""
    rows = (f"{round(1000 * s['start'])}\t{round(1000 * s['end'])}\t{s['text'].strip()}\n" for s in _segments(result))
    return "start\tend\ttext\n" + "".join(rows)


def to_txt(result: dict) -> str:
    return result["text"] + "\n"


def to_json(result: dict) -> str:
    return json.dumps(result, ensure_ascii=False, indent=1) + "\n"


WRITERS = {"txt": to_txt, "json": to_json, "srt": to_srt, "vtt": to_vtt, "tsv": to_tsv}


def write_result(result: dict, stem: Union[str, Path], formats: Sequence[str], max_words: Optional[int] = None,
                 highlight: bool = False) -> List[Path]:
    """Write `result` as stem.<format> for each format ("all" = every one); returns the paths.
    max_words, highlight: word-level srt/vtt cues (see `_cues`)."""
    formats = OUTPUT_FORMATS if "all" in formats else formats
    written = []
    for fmt in formats:
        if fmt not in WRITERS:
            raise ValueError(f"output format must be one of {OUTPUT_FORMATS} or 'all', got {fmt!r}")
        path = Path(f"{stem}.{fmt}")
        path.parent.mkdir(parents=True, exist_ok=True)
        cue_options = (max_words, highlight) if fmt in ("srt", "vtt") else ()
        path.write_text(WRITERS[fmt](result, *cue_options), encoding="utf-8")
        written.append(path)
    return written
