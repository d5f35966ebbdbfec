"""Cleaning: boilerplate stripped, documents split sensibly, near-empty and duplicates dropped."""

from __future__ import annotations

from slimtrain.corpus import clean
from slimtrain.corpus.sources import KIND_GUTENBERG, KIND_RST

from .fakes import GUTENBERG_FOOTER, GUTENBERG_HEADER


def test_normalize_line_endings_trailing_space_and_blank_runs():
    raw = "\ufeffOne  \r\nTwo\r\n\r\n\r\n\r\nThree\t \rFour\n\n\n"
    assert clean.normalize(raw) == "One\nTwo\n\nThree\nFour"


def test_strip_gutenberg_keeps_body_between_markers():
    body = "ACT I.\n\nEnter a ghost, who speaks at length of many things."
    out = clean.normalize(clean.strip_gutenberg(GUTENBERG_HEADER + body + GUTENBERG_FOOTER))
    assert out == body
    assert "Gutenberg" not in out and "eBook" not in out


def test_strip_gutenberg_drops_licence_paragraphs_without_markers():
    text = ("Produced by a volunteer.\n\nThis etext is in the public domain.\n\n"
            "Real verse about the sea.\n\nMore of the poem, as it goes on.")
    out = clean.strip_gutenberg(text)
    assert out == "Real verse about the sea.\n\nMore of the poem, as it goes on."


def test_strip_rst_boilerplate_removes_spdx_and_copyright_only():
    text = (".. SPDX-License-Identifier: GPL-2.0\n:orphan:\n\nTitle\n=====\n\n"
            "Copyright (c) 2019 Someone\nThe driver copies the buffer.")
    out = clean.strip_rst_boilerplate(text)
    assert out == "\nTitle\n=====\n\nThe driver copies the buffer."


def test_split_work_at_act_headings_merges_short_preamble():
    acts = "".join(f"ACT {r}.\n\nScene text for act {r}.\n\n" for r in ("I", "II", "III", "IV"))
    parts = clean.split_work("HAMLET\n\nPersons of the play.\n\n" + acts)
    assert len(parts) == 4
    assert parts[0].startswith("HAMLET") and "ACT I." in parts[0]
    assert parts[3].startswith("ACT IV.")
    assert clean.split_work("No acts here.\n\nJust prose.") == ["No acts here.\n\nJust prose."]


def test_chunk_paragraphs_bounds_size_and_keeps_text():
    paras = [f"paragraph {i} " + "word " * (i % 7 * 8) for i in range(60)]
    text = "\n\n".join(p.strip() for p in paras)
    chunks = clean.chunk_paragraphs(text, max_chars=300)
    assert len(chunks) > 1
    assert all(len(c) <= 300 for c in chunks)
    assert "\n\n".join(chunks) == text
    long_line = "x" * 1000
    assert all(len(c) <= 300 for c in clean.chunk_paragraphs(long_line, 300))
    assert "".join(clean.chunk_paragraphs(long_line, 300)) == long_line


def test_near_empty():
    assert clean.is_near_empty("Title\n=====\n")
    assert clean.is_near_empty("=" * 500)  # long but no words
    assert not clean.is_near_empty(" ".join(["word"] * 100))


def test_deduplicator_first_copy_wins():
    d = clean.Deduplicator()
    assert not d.is_duplicate("a text")
    assert not d.is_duplicate("another text")
    assert d.is_duplicate("a text")


def test_clean_raw_ids_and_kinds():
    body = "\n\n".join(["Some prose line that repeats."] * 40)
    docs = clean.clean_raw("src", "a/b.txt", GUTENBERG_HEADER + body + GUTENBERG_FOOTER,
                           KIND_GUTENBERG, max_chars=400)
    assert len(docs) > 1
    assert [d.doc_id for d in docs] == [f"src:a/b.txt#{i}" for i in range(len(docs))]
    assert all("Gutenberg" not in d.text for d in docs)
    rst = clean.clean_raw("k", "x.rst", ".. SPDX-License-Identifier: GPL-2.0\n\nHello\r\n",
                          KIND_RST)
    assert [d.text for d in rst] == ["Hello"]
