"""Small, offline stand-ins for the corpus sources (nothing here touches a network)."""

from __future__ import annotations

import random
from pathlib import Path

from slimtrain.corpus.sources import (
    KIND_GUTENBERG,
    KIND_RST,
    Fetched,
    Source,
    SourceUnavailable,
)

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from "
    "at which but have an they you were her all she there would their we him been has when "
    "who will more no if out so said what up its about into than them can only other new "
    "some could time these two may then do first any my now such like our over man me even "
    "most made after also did many before must through back years where much your way well "
    "down should because each just those people how too little state good very make world "
    "still own see men work long get here between both life being under never day same "
    "another know while last might us great old year off come since against go came right "
    "used take three kernel driver memory device buffer thread lock queue module function"
).split()


def prose(rng: random.Random, n_paragraphs: int, words_per_paragraph: int = 60) -> str:
    paras = []
    for _ in range(n_paragraphs):
        words = [rng.choice(WORDS) for _ in range(words_per_paragraph)]
        words[0] = words[0].capitalize()
        paras.append(" ".join(words) + ".")
    return "\n\n".join(paras)


GUTENBERG_HEADER = (
    "The Project Gutenberg EBook of Test Play, by Nobody\n\n"
    "This eBook is for the use of anyone anywhere at no cost.\n\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK TEST PLAY ***\n\n"
)
GUTENBERG_FOOTER = (
    "\n\nEnd of the Project Gutenberg EBook of Test Play\n\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK TEST PLAY ***\n\n"
    "Section 1. General Terms of Use and Redistributing Project Gutenberg-tm electronic works\n"
)


RST_HEADER = ".. SPDX-License-Identifier: GPL-2.0\n\nA Title\n=======\n\n"


def make_files(seed: int, n_files: int, kind: str = KIND_GUTENBERG) -> dict[str, str]:
    rng = random.Random(seed)
    files = {}
    for i in range(n_files):
        body = prose(rng, rng.randint(3, 8))
        if kind == KIND_GUTENBERG:
            files[f"work_{i:03d}_gut.txt"] = GUTENBERG_HEADER + body + GUTENBERG_FOOTER
        else:
            files[f"work_{i:03d}_gut.txt"] = RST_HEADER + body
    files["stub_gut.txt"] = "Tiny.\n"  # near-empty: dropped
    files["work_dup_gut.txt"] = files["work_000_gut.txt"]  # exact duplicate: dropped
    return files


def fake_source(name: str = "fake", seed: int = 0, n_files: int = 40, kind: str = KIND_GUTENBERG,
                version: str = "1.0", fail: bool = False) -> Source:
    """A source whose fetch writes generated files (or raises, with ``fail``)."""
    files = make_files(seed, n_files, kind)

    def fetch(workdir: Path) -> Fetched:
        if fail:
            raise SourceUnavailable(f"{name} cannot be downloaded (simulated)")
        root = workdir / "unpacked"
        root.mkdir(parents=True)
        for rel, text in files.items():
            (root / rel).write_text(text, encoding="utf-8")
        return Fetched(root, version, f"{name}-{version}.tar.gz", "0" * 64)

    def iter_raw(root: Path):
        for path in sorted(root.iterdir()):
            yield path.name, path.read_text(encoding="utf-8"), kind

    return Source(name=name, description=f"generated test text ({name})", fetch=fetch,
                  iter_raw=iter_raw, requested_version=version)


def fake_sources(fail_second: bool = False) -> list[Source]:
    return [fake_source("alpha", seed=1), fake_source("beta", seed=2, kind=KIND_RST,
                                                      fail=fail_second)]
