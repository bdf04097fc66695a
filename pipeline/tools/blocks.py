"""Generated blocks in hand-written Markdown: the text between a start and an end marker comment is replaced by a
command's output, the rest of the file is left as written. The benches (`bench/quickstart.py`, `bench/ppo.py`,
`bench/real_hh.py`) copy their result tables into README.md this way. Nothing runs at import.
"""
from __future__ import annotations

from pathlib import Path


def replace_between(path: Path, start: str, end: str, body: str) -> bool:
    """Put `body` between the lines `start` and `end` of the file at `path`; False (the file unchanged) when either
    marker is missing."""
    text = path.read_text()
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{body}{end}{tail}")
    return True
