"""Turning raw package files into pretraining documents.

Pretraining text should be prose, not licence boilerplate, and documents should be
neither empty nor repeated (duplicates overweight their text and leak between the
train and validation splits).  This module:

* normalises whitespace and line endings,
* strips Project Gutenberg headers/footers/licence paragraphs (``strip_gutenberg``)
  and licence/SPDX lines from reStructuredText (``strip_rst_boilerplate``),
* splits long works into documents of manageable size - plays and epics at their
  ``ACT``/``BOOK`` headings, everything at paragraph boundaries past ``max_chars`` -
  so that the hash split in :mod:`split` is fine grained and the validation share is
  stable,
* drops near-empty documents and exact duplicates (:class:`Deduplicator`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from .sources import KIND_GUTENBERG, KIND_RST

DEFAULT_MIN_CHARS = 200
DEFAULT_MIN_WORDS = 30
DEFAULT_MAX_CHARS = 20_000


@dataclass(frozen=True)
class Document:
    """A cleaned document.  ``doc_id`` is its identity (source, file, part) and
    decides its split; ``text`` is what the model sees."""

    doc_id: str
    source: str
    text: str


_MULTI_BLANK = re.compile(r"\n{3,}")


def normalize(text: str) -> str:
    """Unix line endings, no BOM, no trailing spaces, at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _MULTI_BLANK.sub("\n\n", text).strip("\n")


_GUT_START = re.compile(
    r"^\s*\*{3}\s*START OF (?:THE |THIS )?PROJECT GUTENBERG.*$"
    r"|^\s*\*END\*THE SMALL PRINT.*$",
    re.IGNORECASE | re.MULTILINE,
)
_GUT_END = re.compile(
    r"^\s*\*{3}\s*END OF (?:THE |THIS )?PROJECT GUTENBERG.*$"
    r"|^\s*End of (?:the )?Project Gutenberg.*$"
    r"|^\s*End of Project Gutenberg's.*$",
    re.IGNORECASE | re.MULTILINE,
)
_GUT_PARAGRAPH = re.compile(
    r"project gutenberg|gutenberg\.org|gutenberg-tm|\bebook\b|\be-?text\b|"
    r"small print|public domain|this file should be named|produced by\b|"
    r"transcriber'?s note|http://|https://",
    re.IGNORECASE,
)
_GUT_PARAGRAPH_MAX_CHARS = 1500


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg header, footer and licence paragraphs.

    Text between the ``*** START OF ... ***`` / ``*** END OF ... ***`` markers is
    kept when the markers exist; short paragraphs that talk about Gutenberg, eBooks,
    licences or URLs are dropped wherever they sit (older files lack markers).
    """
    start = _GUT_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUT_END.search(text)
    if end:
        text = text[: end.start()]
    paragraphs = re.split(r"\n\s*\n", text)
    kept = [
        p for p in paragraphs
        if not (len(p) <= _GUT_PARAGRAPH_MAX_CHARS and _GUT_PARAGRAPH.search(p))
    ]
    return "\n\n".join(kept)


_RST_BOILERPLATE_LINE = re.compile(
    r"^\s*(?:\.\.\s+SPDX-License-Identifier:.*"
    r"|SPDX-License-Identifier:.*"
    r"|:orphan:\s*"
    r"|\.\.\s+(?:Copyright|\(c\)|\(C\)).*"
    r"|Copyright\s+(?:\(c\)|\(C\)|©)\s*\d{4}.*)$"
)


def strip_rst_boilerplate(text: str) -> str:
    """Drop SPDX licence tags, ``:orphan:`` markers and copyright lines from reST."""
    return "\n".join(
        line for line in text.split("\n") if not _RST_BOILERPLATE_LINE.match(line)
    )


_WORK_HEADING = re.compile(r"^[ \t]*(?:ACT|Act|BOOK|Book)[ \t]+[IVXLC]+\b.*$", re.MULTILINE)
_MIN_HEADINGS = 3
_PREAMBLE_MERGE_CHARS = 4000


def split_work(text: str) -> list[str]:
    """Split a play or epic at its ACT/BOOK headings (when it has at least three);
    a short preamble (title, persons of the play) joins the first part."""
    starts = [m.start() for m in _WORK_HEADING.finditer(text)]
    if len(starts) < _MIN_HEADINGS:
        return [text]
    bounds = [0] + starts + [len(text)]
    parts = [text[a:b] for a, b in zip(bounds, bounds[1:]) if text[a:b].strip()]
    if len(parts) > 1 and len(parts[0]) < _PREAMBLE_MERGE_CHARS and starts[0] > 0:
        parts = [parts[0] + parts[1]] + parts[2:]
    return parts


def chunk_paragraphs(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> list[str]:
    """Greedily pack paragraphs into chunks of at most ``max_chars`` characters
    (a single paragraph longer than that is cut at line boundaries, then hard)."""
    if len(text) <= max_chars:
        return [text]
    pieces: list[str] = []
    for para in text.split("\n\n"):
        if len(para) <= max_chars:
            pieces.append(para)
            continue
        line_buf = ""
        for line in para.split("\n"):
            while len(line) > max_chars:
                if line_buf:
                    pieces.append(line_buf)
                    line_buf = ""
                pieces.append(line[:max_chars])
                line = line[max_chars:]
            if line_buf and len(line_buf) + 1 + len(line) > max_chars:
                pieces.append(line_buf)
                line_buf = line
            else:
                line_buf = f"{line_buf}\n{line}" if line_buf else line
        if line_buf:
            pieces.append(line_buf)
    chunks: list[str] = []
    cur = ""
    for piece in pieces:
        if cur and len(cur) + 2 + len(piece) > max_chars:
            chunks.append(cur)
            cur = piece
        else:
            cur = f"{cur}\n\n{piece}" if cur else piece
    if cur:
        chunks.append(cur)
    return chunks


def is_near_empty(text: str, min_chars: int = DEFAULT_MIN_CHARS,
                  min_words: int = DEFAULT_MIN_WORDS) -> bool:
    """True for documents too short to teach anything (stubs, bare includes, titles)."""
    if len(text) < min_chars:
        return True
    return len(re.findall(r"[A-Za-z]{2,}", text)) < min_words


def clean_raw(source: str, rel_id: str, raw: str, kind: str,
              max_chars: int = DEFAULT_MAX_CHARS) -> list[Document]:
    """Clean one raw file into zero or more documents (before near-empty/dup filters)."""
    if kind == KIND_GUTENBERG:
        text = normalize(strip_gutenberg(normalize(raw)))
        works = split_work(text)
    elif kind == KIND_RST:
        text = normalize(strip_rst_boilerplate(normalize(raw)))
        works = [text]
    else:
        works = [normalize(raw)]
    docs: list[Document] = []
    part = 0
    for work in works:
        for chunk in chunk_paragraphs(normalize(work), max_chars):
            chunk = chunk.strip("\n")
            if chunk:
                docs.append(Document(f"{source}:{rel_id}#{part}", source, chunk))
                part += 1
    return docs


class Deduplicator:
    """Exact-duplicate filter on the cleaned text (first occurrence wins)."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def is_duplicate(self, text: str) -> bool:
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        if digest in self._seen:
            return True
        self._seen.add(digest)
        return False
