"""Building the default corpus folder: fetch, clean, split, tokenize, pre-tokenize.

Layout of the data directory (default ``$XDG_CACHE_HOME/slimtrain/data``, i.e.
``~/.cache/slimtrain/data``; overridden by ``$SLIMTRAIN_DATA_DIR`` and then by an
explicit ``data_dir``)::

    <data_dir>/text/          cleaned documents, shared by every vocab size
        train.jsonl val.jsonl manifest.json
    <data_dir>/vocab-<N>/     one folder per vocab size: the torchtitan assets
        tokenizer.json tokenizer_config.json train.bin val.bin manifest.json

Two stages so that asking for another vocab size re-tokenizes without re-fetching.
Each stage is built in a temporary sibling folder and renamed into place only when
complete (its manifest written last), under a file lock so that several ranks
calling :func:`ensure_corpus` at once prepare it only once.  A stage whose manifest
matches the requested settings and whose files hash correctly is left alone.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import tokenizers

from slimtrain.disk_space import NO_SPACE, write_failed_message

from . import clean, split
from . import tokenizer as tkn
from .manifest import FORMAT_VERSION, check_folder, file_entries, read_manifest, write_manifest
from .sources import Source, default_sources

log = logging.getLogger("slimtrain.corpus")

DEFAULT_VOCAB_SIZE = 32000
# The tokenizer trains on the whole train split by default (about 10 s for 40 M
# characters at vocab 32000 on 2 cores).  A budget, if set, trains it on a fixed,
# deterministic prefix of the hash-shuffled train documents instead.
DEFAULT_TOKENIZER_TRAIN_CHARS: int | None = None
TEXT_DIR = "text"


class CorpusError(RuntimeError):
    """The corpus cannot be prepared (e.g. no source could be fetched)."""


@dataclass(frozen=True)
class CorpusSettings:
    """Everything that changes the output; recorded in the manifests."""

    vocab_size: int = DEFAULT_VOCAB_SIZE
    val_fraction: float = split.DEFAULT_VAL_FRACTION
    split_salt: str = split.DEFAULT_SALT
    min_chars: int = clean.DEFAULT_MIN_CHARS
    min_words: int = clean.DEFAULT_MIN_WORDS
    max_doc_chars: int = clean.DEFAULT_MAX_CHARS
    tokenizer_train_chars: int | None = DEFAULT_TOKENIZER_TRAIN_CHARS

    def text_settings(self, sources: Sequence[Source]) -> dict[str, Any]:
        return {
            "sources": [s.name for s in sources],
            "val_fraction": self.val_fraction,
            "split_salt": self.split_salt,
            "min_chars": self.min_chars,
            "min_words": self.min_words,
            "max_doc_chars": self.max_doc_chars,
        }

    def vocab_settings(self, text_fingerprint: str) -> dict[str, Any]:
        return {
            "vocab_size": self.vocab_size,
            "tokenizer_train_chars": self.tokenizer_train_chars,
            "min_frequency": tkn.MIN_FREQUENCY,
            "special_tokens": list(tkn.SPECIAL_TOKENS),
            "tokenizers_version": tokenizers.__version__,
            "text_fingerprint": text_fingerprint,
        }


@dataclass(frozen=True)
class PrepareResult:
    path: Path          # the vocab folder: tokenizer files, token files, manifest
    built: bool         # False when everything was already present
    manifest: dict[str, Any]


def default_data_dir() -> Path:
    """``$SLIMTRAIN_DATA_DIR``, else ``$XDG_CACHE_HOME/slimtrain/data``, else
    ``~/.cache/slimtrain/data``."""
    env = os.environ.get("SLIMTRAIN_DATA_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "slimtrain" / "data"


def vocab_dir_name(vocab_size: int) -> str:
    return f"vocab-{vocab_size}"


@contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        fh = open(data_dir / ".lock", "a")
    except OSError as e:
        # A read-only, already prepared cache (e.g. a shared mount) needs no lock;
        # if anything must be built, writing will fail with a clear error anyway.
        log.warning("cannot lock %s (%s); continuing without the lock", data_dir, e)
        yield
        return
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process preparing %s to finish", data_dir)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_stale_temporaries(data_dir: Path) -> None:
    """Leftovers of a crashed run (only ever touched while holding the lock)."""
    for p in data_dir.glob(".tmp-*"):
        log.info("removing leftover %s from an interrupted run", p)
        shutil.rmtree(p, ignore_errors=True)


def _install(tmp: Path, target: Path) -> None:
    """Atomically replace ``target`` with the finished ``tmp`` folder."""
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a shared cache should be readable
    old = None
    if target.exists():
        old = target.with_name(f".tmp-old-{target.name}-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


# ------------------------------------------------------------------ text stage
def _collect_documents(sources: Sequence[Source], settings: CorpusSettings,
                       scratch: Path) -> tuple[dict[str, list], list[dict], dict[str, int]]:
    docs: dict[str, list] = {split.TRAIN: [], split.VAL: []}
    records: list[dict] = []
    dedup = clean.Deduplicator()
    totals = {"raw_files": 0, "documents_before_filters": 0,
              "dropped_near_empty": 0, "dropped_duplicates": 0}
    for src in sources:
        t0 = time.perf_counter()
        rec: dict[str, Any] = {"name": src.name, "description": src.description}
        log.info("source %s: fetching (%s)", src.name, src.description)
        with tempfile.TemporaryDirectory(dir=scratch, prefix=f"fetch-{src.name}-") as w:
            try:
                fetched = src.fetch(Path(w))
            except Exception as e:  # any failure to obtain a source means: skip it
                log.warning("source %s is unavailable on this machine, skipping it: %s",
                            src.name, e)
                rec.update(status="skipped", reason=str(e))
                records.append(rec)
                continue
            rec.update(version=fetched.version, artifact=fetched.artifact,
                       artifact_sha256=fetched.sha256)
            counts = {s: {"documents": 0, "characters": 0} for s in (split.TRAIN, split.VAL)}
            n_files = n_empty = n_dup = n_before = 0
            for rel, raw, kind in src.iter_raw(fetched.root):
                n_files += 1
                for doc in clean.clean_raw(src.name, rel, raw, kind, settings.max_doc_chars):
                    n_before += 1
                    if clean.is_near_empty(doc.text, settings.min_chars, settings.min_words):
                        n_empty += 1
                        continue
                    if dedup.is_duplicate(doc.text):
                        n_dup += 1
                        continue
                    which = split.split_of(doc.doc_id, settings.val_fraction, settings.split_salt)
                    docs[which].append(doc)
                    counts[which]["documents"] += 1
                    counts[which]["characters"] += len(doc.text)
        kept = counts[split.TRAIN]["documents"] + counts[split.VAL]["documents"]
        if kept == 0:
            log.warning("source %s yielded no usable documents, skipping it", src.name)
            rec.update(status="skipped", reason="no usable documents found")
            records.append(rec)
            continue
        rec.update(status="ok", files=n_files, documents_before_filters=n_before,
                   dropped_near_empty=n_empty, dropped_duplicates=n_dup, splits=counts)
        records.append(rec)
        totals["raw_files"] += n_files
        totals["documents_before_filters"] += n_before
        totals["dropped_near_empty"] += n_empty
        totals["dropped_duplicates"] += n_dup
        log.info("source %s %s: %d files -> %d documents (%d near-empty, %d duplicates "
                 "dropped) in %.1fs", src.name, fetched.version, n_files, kept, n_empty,
                 n_dup, time.perf_counter() - t0)
    return docs, records, totals


def _build_text(data_dir: Path, sources: Sequence[Source], settings: CorpusSettings,
                wanted: dict[str, Any]) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(dir=data_dir, prefix=".tmp-text-"))
    try:
        docs, records, totals = _collect_documents(sources, settings, tmp)
        if not docs[split.TRAIN] and not docs[split.VAL]:
            reasons = "; ".join(f"{r['name']}: {r.get('reason')}" for r in records)
            raise CorpusError(f"no source could be fetched, nothing to build from ({reasons})")
        if not docs[split.TRAIN] or not docs[split.VAL]:
            raise CorpusError("too little text: one split is empty "
                              f"(train {len(docs[split.TRAIN])}, val {len(docs[split.VAL])} docs)")
        splits: dict[str, Any] = {}
        for name, items in docs.items():
            items.sort(key=lambda d: split.order_key(d.doc_id, settings.split_salt))
            with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for d in items:
                    f.write(json.dumps({"id": d.doc_id, "source": d.source, "text": d.text},
                                       ensure_ascii=False, sort_keys=True) + "\n")
            splits[name] = {"file": f"{name}.jsonl", "documents": len(items),
                            "characters": sum(len(d.text) for d in items)}
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": "slimtrain-corpus-text",
            "created_at": _now(),
            "settings": wanted,
            "sources": records,
            "cleaning": totals,
            "splits": splits,
            "files": file_entries(tmp, [f"{n}.jsonl" for n in splits]),
        }
        write_manifest(tmp, manifest)
        _install(tmp, data_dir / TEXT_DIR)
        log.info("text corpus: train %d docs / %d chars, val %d docs / %d chars",
                 splits["train"]["documents"], splits["train"]["characters"],
                 splits["val"]["documents"], splits["val"]["characters"])
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _text_fingerprint(text_manifest: dict[str, Any]) -> str:
    return ",".join(f"{n}:{e['sha256']}" for n, e in sorted(text_manifest["files"].items()))


def _iter_texts(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


# ----------------------------------------------------------------- vocab stage
def _build_vocab(data_dir: Path, text_manifest: dict[str, Any], settings: CorpusSettings,
                 wanted: dict[str, Any]) -> dict[str, Any]:
    text_dir = data_dir / TEXT_DIR
    target = data_dir / vocab_dir_name(settings.vocab_size)
    tmp = Path(tempfile.mkdtemp(dir=data_dir, prefix=f".tmp-{target.name}-"))
    try:
        train_path = text_dir / "train.jsonl"
        budget = settings.tokenizer_train_chars
        sample: list[str] = []
        n_chars = 0
        for text in _iter_texts(train_path):
            if budget is not None and n_chars >= budget:
                break
            sample.append(text)
            n_chars += len(text)
        log.info("training byte-level BPE tokenizer (vocab %d) on %d train documents "
                 "(%d characters)", settings.vocab_size, len(sample), n_chars)
        t0 = time.perf_counter()
        tok = tkn.train_tokenizer(sample, settings.vocab_size, length=len(sample))
        del sample
        train_s = time.perf_counter() - t0
        log.info("  tokenizer trained in %.1fs (vocab %d)", train_s, tok.get_vocab_size())
        tkn.save_tokenizer(tok, tmp)
        tok = tkn.load_tokenizer(tmp)  # encode with exactly what was written
        dtype = tkn.token_dtype(tok.get_vocab_size())
        splits: dict[str, Any] = {}
        log.info("pre-tokenizing train and val splits")
        for name in (split.TRAIN, split.VAL):
            n_tok = tkn.encode_documents(tok, _iter_texts(text_dir / f"{name}.jsonl"),
                                         tmp / f"{name}.bin")
            splits[name] = {
                **text_manifest["splits"][name],
                "file": f"{name}.bin",
                "text_file": f"../{TEXT_DIR}/{name}.jsonl",
                "tokens": n_tok,
                "dtype": dtype.name,
            }
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": "slimtrain-corpus",
            "created_at": _now(),
            "settings": wanted,
            "vocab_size": tok.get_vocab_size(),
            "tokenizer": {
                "type": "byte-level BPE (HuggingFace tokenizers)",
                "bos_token": tkn.BOS_TOKEN, "bos_id": tok.token_to_id(tkn.BOS_TOKEN),
                "eos_token": tkn.EOS_TOKEN, "eos_id": tok.token_to_id(tkn.EOS_TOKEN),
                "train_seconds": round(train_s, 1),
            },
            "token_files": {
                "layout": "flat array of token ids; every document is written as "
                          "<bos> text <eos>, documents back to back in a fixed "
                          "hash order",
                "dtype": dtype.name,
            },
            "sources": text_manifest["sources"],
            "cleaning": text_manifest["cleaning"],
            "splits": splits,
            "files": file_entries(tmp, [tkn.TOKENIZER_FILE, tkn.TOKENIZER_CONFIG_FILE,
                                        "train.bin", "val.bin"]),
            "text_files": text_manifest["files"],
            "versions": {
                "python": platform.python_version(),
                "tokenizers": tokenizers.__version__,
                "numpy": np.__version__,
            },
        }
        write_manifest(tmp, manifest)
        _install(tmp, target)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------- public
MIN_VOCAB_SIZE = 256 + len(tkn.SPECIAL_TOKENS)  # every byte, plus the special tokens



def prepare_corpus(data_dir: str | os.PathLike | None = None,
                   vocab_size: int = DEFAULT_VOCAB_SIZE, force: bool = False,
                   sources: Sequence[Source] | None = None,
                   settings: CorpusSettings | None = None) -> PrepareResult:
    """Prepare (or find already prepared) the corpus for ``vocab_size``.

    ``force`` rebuilds both stages, re-fetching every source (use it to retry
    sources that were skipped).  Raises :class:`CorpusError` when nothing could be
    built.
    """
    t_start = time.perf_counter()
    min_vocab = MIN_VOCAB_SIZE
    if vocab_size < min_vocab:
        raise ValueError(f"vocab size must be at least {min_vocab} (256 bytes + "
                         f"{len(tkn.SPECIAL_TOKENS)} special tokens), got {vocab_size}")
    data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
    if data_dir.exists() and not data_dir.is_dir():
        raise CorpusError(f"data dir {data_dir} is a file, not a folder (--data-dir / [slimtrain] data_dir)")
    sources = list(default_sources() if sources is None else sources)
    settings = settings or CorpusSettings()
    if settings.vocab_size != vocab_size:
        settings = CorpusSettings(**{**asdict(settings), "vocab_size": vocab_size})
    try:
        return _prepare_locked(data_dir, vocab_size, force, sources, settings, t_start)
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        # the stage being built was a temporary folder, removed on the way out: nothing half
        # written is installed, and a later run builds it again
        raise CorpusError(f"corpus not prepared: {write_failed_message(data_dir, e)}; nothing half-written "
                          f"was kept in {data_dir}") from None


def _prepare_locked(data_dir: Path, vocab_size: int, force: bool, sources: list, settings: CorpusSettings,
                    t_start: float) -> PrepareResult:
    with _locked(data_dir):
        _remove_stale_temporaries(data_dir)
        text_wanted = settings.text_settings(sources)
        text_ok, why = check_folder(data_dir / TEXT_DIR, text_wanted)
        built = False
        if text_ok and not force:
            text_manifest = read_manifest(data_dir / TEXT_DIR)
            log.info("text corpus already prepared at %s", data_dir / TEXT_DIR)
        else:
            log.info("preparing text corpus in %s (%s)", data_dir / TEXT_DIR,
                     "--force" if force else why)
            text_manifest = _build_text(data_dir, sources, settings, text_wanted)
            built = True
        skipped = [s["name"] for s in text_manifest["sources"] if s["status"] != "ok"]
        if skipped and not built:
            log.info("note: sources %s were skipped when the corpus was built; "
                     "run with --force to retry them", ", ".join(skipped))
        target = data_dir / vocab_dir_name(vocab_size)
        vocab_wanted = settings.vocab_settings(_text_fingerprint(text_manifest))
        vocab_ok, why = check_folder(target, vocab_wanted)
        if vocab_ok and not force:
            manifest = read_manifest(target)
            log.info("corpus for vocab %d already prepared at %s (manifest matches); "
                     "nothing to do", vocab_size, target)
            return PrepareResult(target, built, manifest)
        log.info("preparing tokenizer and token files in %s (%s)", target,
                 "--force" if force else why)
        manifest = _build_vocab(data_dir, text_manifest, settings, vocab_wanted)
        log.info("corpus ready at %s in %.1fs: train %d tokens, val %d tokens, vocab %d",
                 target, time.perf_counter() - t_start, manifest["splits"]["train"]["tokens"],
                 manifest["splits"]["val"]["tokens"], manifest["vocab_size"])
        return PrepareResult(target, True, manifest)


def ensure_corpus(data_dir: str | os.PathLike | None = None,
                  vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Return the folder holding ``tokenizer.json``, ``tokenizer_config.json``,
    ``train.bin``, ``val.bin`` and ``manifest.json`` for ``vocab_size``, preparing it
    first if needed.  Use it as torchtitan's ``model.hf_assets_path`` and as the
    ``dataset_path`` of the ``slimtrain`` dataset."""
    return prepare_corpus(data_dir, vocab_size).path
