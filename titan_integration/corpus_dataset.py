"""The pre-tokenized default corpus as a torchtitan dataset and dataloaders.

torchtitan 0.2.2's ``HuggingFaceTextDataset`` tokenizes text on the fly and yields
``({"input": x}, labels)`` with ``x`` and ``labels`` of length ``seq_len``.  This
module yields the same thing from the flat token files written by
``slimtrain prepare-data`` (memory-mapped, so loading is copy-and-cast, far above
GPU speed), and offers builders with the signatures of torchtitan's
``build_text_dataloader`` / ``build_text_validation_dataloader`` (and a validator
builder, since torchtitan's ``Validator`` hard-codes its dataloader builder).

Samples are windows ``tokens[k*seq_len : k*seq_len + seq_len + 1]``: consecutive
windows share one token, so every token but the first is a label exactly once.
Windows are dealt to data-parallel ranks round-robin and cut to the same count on
every rank (no rank waits on a collective another rank never reaches).  The train
loader visits its windows in a fresh seeded permutation per epoch and loops; the
validation loader visits them in order once per pass.  ``state_dict`` is
``(epoch, position)``, so resuming is exact.

Only this module of the package imports torchtitan (after applying the project's
CPU shim, which must precede any torchtitan import and is a no-op on GPU machines).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset, get_worker_info

try:  # the project's rule: the CPU shim runs before torchtitan is first imported
    from slimtrain.titan_integration import cpu_shim
except ImportError:  # pragma: no cover - shim not present in this checkout
    cpu_shim = None
if cpu_shim is not None:
    cpu_shim.apply()

from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import JobConfig
from torchtitan.hf_datasets import text_datasets as _titan_text

from slimtrain.corpus.manifest import read_manifest, verify_files
from slimtrain.corpus.prepare import CorpusError, ensure_corpus, vocab_dir_name
from slimtrain.corpus.sources import sha256_file
from slimtrain.corpus.tokenizer import TOKENIZER_FILE

log = logging.getLogger("slimtrain.corpus")

#: ``training.dataset`` / ``validation.dataset`` names served by this module; any
#: other name (``c4``, ``c4_test``, ...) is handed to torchtitan's own builders.
DATASET_NAMES = frozenset({"slimtrain", "slimtrain_validation"})
DEFAULT_SEED = 0


class TokenFileDataset(IterableDataset, Stateful):
    """Fixed-length windows over a flat token file, sharded by dp rank.

    Args:
        path: a ``train.bin``/``val.bin`` written by ``prepare-data``.
        seq_len: tokens per sample (inputs and labels each).
        dp_rank, dp_world_size: this rank's share of the windows.
        infinite: loop over epochs (training) or stop after one pass (validation).
        shuffle: visit windows in a seeded per-epoch permutation instead of in order.
        seed: permutation seed (same on every rank: ranks must agree on the order).
        restart_each_pass: start every ``iter()`` from the beginning (validation
            evaluates the same samples each time) unless a state was just loaded.
        dtype: token dtype; by default read from the folder's ``manifest.json``.
    """

    def __init__(self, path: str | Path, seq_len: int, dp_rank: int = 0,
                 dp_world_size: int = 1, infinite: bool = False, shuffle: bool = False,
                 seed: int = DEFAULT_SEED, restart_each_pass: bool = False,
                 dtype: str | np.dtype | None = None) -> None:
        if seq_len < 1:
            raise ValueError("seq_len must be positive")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_world_size})")
        self.path = Path(path)
        if dtype is None:
            manifest = read_manifest(self.path.parent) or {}
            dtype = manifest.get("token_files", {}).get("dtype", "uint16")
        self.dtype = np.dtype(dtype)
        self.seq_len = seq_len
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.infinite = infinite
        self.shuffle = shuffle
        self.seed = seed
        self.restart_each_pass = restart_each_pass
        self.num_tokens = self.path.stat().st_size // self.dtype.itemsize
        n_windows = max(0, (self.num_tokens - 1) // seq_len)
        self.windows_per_rank = n_windows // dp_world_size
        if self.windows_per_rank == 0:
            raise ValueError(f"{self.path}: {self.num_tokens} tokens give no window of "
                             f"{seq_len} + 1 tokens for each of {dp_world_size} ranks")
        self._tokens: np.ndarray | None = None
        self._epoch = 0
        self._pos = 0
        self._resumed = False

    # Memory maps are opened lazily and never pickled: dataloader workers reopen.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tokens"] = None
        return state

    def _token_array(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r",
                                     shape=(self.num_tokens,))
        return self._tokens

    def __len__(self) -> int:
        """Samples per pass for this rank (all workers together)."""
        return self.windows_per_rank

    def rank_windows(self, epoch: int) -> np.ndarray:
        """Window indices this rank visits in ``epoch``, in order."""
        n = self.windows_per_rank * self.dp_world_size
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
        else:
            order = np.arange(n)
        return order[self.dp_rank::self.dp_world_size]

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        if self.restart_each_pass and not self._resumed:
            self._epoch, self._pos = 0, 0
        self._resumed = False
        tokens = self._token_array()
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        seq_len = self.seq_len
        while True:
            windows = self.rank_windows(self._epoch)[worker::n_workers]
            while self._pos < len(windows):
                start = int(windows[self._pos]) * seq_len
                x = torch.from_numpy(tokens[start:start + seq_len + 1].astype(np.int64))
                self._pos += 1
                yield {"input": x[:-1]}, x[1:]
            self._epoch += 1
            self._pos = 0
            if not self.infinite:
                return
            log.info("dataset %s is being re-looped (epoch %d)", self.path, self._epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "pos": self._pos, "seq_len": self.seq_len,
                "dp_world_size": self.dp_world_size, "num_tokens": self.num_tokens}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("seq_len", "dp_world_size", "num_tokens"):
            if key in state_dict and state_dict[key] != getattr(self, key):
                raise ValueError(f"cannot resume: {key} was {state_dict[key]}, "
                                 f"now {getattr(self, key)}")
        self._epoch = int(state_dict["epoch"])
        self._pos = int(state_dict["pos"])
        self._resumed = True


# ------------------------------------------------------------------ resolution
def resolve_corpus_dir(dataset_path: str | None, tokenizer: BaseTokenizer | None,
                       job_config: JobConfig | None = None) -> Path:
    """The folder holding ``train.bin``/``val.bin`` for this run.

    In order: ``dataset_path`` (a prepared vocab folder, or a data directory with
    ``vocab-<N>`` inside, N the tokenizer's vocab size); the tokenizer's own folder
    (``model.hf_assets_path``) when it holds token files; else the default corpus,
    prepared on first use.
    """
    vocab = tokenizer.get_vocab_size() if tokenizer is not None else None
    candidates: list[Path] = []
    if dataset_path:
        p = Path(dataset_path).expanduser()
        candidates.append(p)
        if vocab is not None:
            candidates.append(p / vocab_dir_name(vocab))
    else:
        tok_path = getattr(tokenizer, "tokenizer_path", None)
        if tok_path:
            candidates.append(Path(tok_path))
        assets = getattr(getattr(job_config, "model", None), "hf_assets_path", None)
        if assets:
            candidates.append(Path(assets))
    for c in candidates:
        if (c / "train.bin").is_file() and (c / "val.bin").is_file():
            return c
    if dataset_path:
        raise FileNotFoundError(
            f"no prepared corpus (train.bin, val.bin) at {dataset_path}"
            + (f" or {Path(dataset_path) / vocab_dir_name(vocab)}" if vocab else "")
            + "; run `slimtrain prepare-data --data-dir DIR --vocab-size N`")
    return ensure_corpus(vocab_size=vocab if vocab is not None else 32000)


def _check_tokenizer(corpus_dir: Path, tokenizer: BaseTokenizer | None) -> None:
    """Token ids are meaningless under another tokenizer: refuse a mismatch."""
    if tokenizer is None:
        return
    tok_path = getattr(tokenizer, "tokenizer_path", None)
    manifest = read_manifest(corpus_dir) or {}
    recorded = manifest.get("files", {}).get(TOKENIZER_FILE, {}).get("sha256")
    if tok_path and recorded and (Path(tok_path) / TOKENIZER_FILE).is_file():
        if sha256_file(Path(tok_path) / TOKENIZER_FILE) != recorded:
            raise ValueError(
                f"the tokenizer at {tok_path} is not the one {corpus_dir} was "
                "tokenized with; set model.hf_assets_path to the corpus folder")
    elif manifest.get("vocab_size") and manifest["vocab_size"] != tokenizer.get_vocab_size():
        raise ValueError(f"tokenizer vocab {tokenizer.get_vocab_size()} != corpus vocab "
                         f"{manifest['vocab_size']} ({corpus_dir})")


def _verify_token_file(corpus_dir: Path, split: str, tokenizer: BaseTokenizer | None) -> None:
    """Refuse a damaged token file before training reads it: against the manifest's size and
    sha256 when the folder has one (``prepare-data`` writes it; reading costs about a second per
    GB, once per start), else every token id must be below the tokenizer's vocabulary. Without
    this a flipped or truncated file fails mid-run as an embedding IndexError naming no file."""
    name = f"{split}.bin"
    manifest = read_manifest(corpus_dir)
    if manifest is not None and name in manifest.get("files", {}):
        ok, why = verify_files(corpus_dir, manifest, [name])
        if not ok:
            raise CorpusError(f"the {split} token file is damaged: {why}; prepare it again "
                              f"(`slimtrain prepare-data`) or point --training.dataset_path elsewhere")
        return
    vocab = tokenizer.get_vocab_size() if tokenizer is not None else None
    path = corpus_dir / name
    dtype = np.dtype((manifest or {}).get("token_files", {}).get("dtype", "uint16"))
    if path.stat().st_size % dtype.itemsize:
        raise CorpusError(f"{path}: {path.stat().st_size} bytes is not a whole number of {dtype} tokens")
    log.warning("%s has no manifest entry: checked only that its token ids fit the vocabulary", path)
    if vocab is not None:
        top = int(np.memmap(path, dtype=dtype, mode="r").max(initial=0))
        if top >= vocab:
            raise CorpusError(f"{path} holds token id {top}, outside the tokenizer's vocabulary of "
                              f"{vocab}: the file is damaged or was tokenized with another tokenizer")


def build_corpus_dataset(dp_world_size: int, dp_rank: int, tokenizer: BaseTokenizer | None,
                         dataset_path: str | None, seq_len: int, split: str,
                         infinite: bool, job_config: JobConfig | None = None,
                         seed: int = DEFAULT_SEED) -> TokenFileDataset:
    """A :class:`TokenFileDataset` over the ``train`` or ``val`` split."""
    corpus_dir = resolve_corpus_dir(dataset_path, tokenizer, job_config)
    _check_tokenizer(corpus_dir, tokenizer)
    _verify_token_file(corpus_dir, split, tokenizer)
    is_train = split == "train"
    ds = TokenFileDataset(
        corpus_dir / f"{split}.bin", seq_len=seq_len, dp_rank=dp_rank,
        dp_world_size=dp_world_size, infinite=infinite, shuffle=is_train, seed=seed,
        restart_each_pass=not is_train,
    )
    log.info("slimtrain corpus %s split from %s: %d tokens, %d samples of %d per rank",
             split, corpus_dir, ds.num_tokens, len(ds), seq_len)
    return ds


# -------------------------------------------------------------------- builders
def corpus_loader(dataset, batch_size: int, dp_rank: int = 0, dp_world_size: int = 1, **kwargs) -> ParallelAwareDataloader:
    """torchtitan's checkpointable, rank-aware loader over ``dataset`` (what training uses; the
    loader benchmark measures it through here, without importing torchtitan itself)."""
    return ParallelAwareDataloader(dataset, dp_rank=dp_rank, dp_world_size=dp_world_size, batch_size=batch_size, **kwargs)


def build_text_dataloader(dp_world_size: int, dp_rank: int, tokenizer: BaseTokenizer,
                          job_config: JobConfig, infinite: bool = True
                          ) -> ParallelAwareDataloader:
    """Training dataloader; same signature as torchtitan's ``build_text_dataloader``.

    ``training.dataset = "slimtrain"`` selects the default corpus's train split
    (``training.dataset_path`` optional, see :func:`resolve_corpus_dir`); any other
    dataset name is built by torchtitan's own builder.
    """
    if job_config.training.dataset.lower() not in DATASET_NAMES:
        return _titan_text.build_text_dataloader(
            dp_world_size=dp_world_size, dp_rank=dp_rank, tokenizer=tokenizer,
            job_config=job_config, infinite=infinite)
    ds = build_corpus_dataset(
        dp_world_size, dp_rank, tokenizer, job_config.training.dataset_path,
        job_config.training.seq_len, "train", infinite, job_config,
        seed=getattr(job_config.debug, "seed", None) or DEFAULT_SEED)
    return corpus_loader(ds, job_config.training.local_batch_size, dp_rank, dp_world_size,
                         **asdict(job_config.training.dataloader))


def build_text_validation_dataloader(dp_world_size: int, dp_rank: int,
                                     tokenizer: BaseTokenizer, job_config: JobConfig,
                                     infinite: bool = False) -> ParallelAwareDataloader:
    """Validation dataloader; same signature as torchtitan's
    ``build_text_validation_dataloader``.  With ``validation.dataset = "slimtrain"``
    (or ``"slimtrain_validation"``) it passes once over the val split in order each
    time it is iterated; other names go to torchtitan's builder."""
    if job_config.validation.dataset.lower() not in DATASET_NAMES:
        return _titan_text.build_text_validation_dataloader(
            dp_world_size=dp_world_size, dp_rank=dp_rank, tokenizer=tokenizer,
            job_config=job_config, infinite=infinite)
    ds = build_corpus_dataset(
        dp_world_size, dp_rank, tokenizer, job_config.validation.dataset_path,
        job_config.validation.seq_len, "val", infinite, job_config)
    return corpus_loader(ds, job_config.validation.local_batch_size, dp_rank, dp_world_size,
                         **asdict(job_config.validation.dataloader))


# Aliases for TrainSpec wiring (titan_integration/data.py calls the short names).
build_corpus_dataloader = build_dataloader = build_text_dataloader
build_corpus_validation_dataloader = build_validation_dataloader = build_text_validation_dataloader


@contextmanager
def _validator_uses_corpus_loader() -> Iterator[None]:
    from torchtitan.components import validate

    original = validate.build_text_validation_dataloader
    validate.build_text_validation_dataloader = build_text_validation_dataloader
    try:
        yield
    finally:
        validate.build_text_validation_dataloader = original


def build_corpus_validator(*args: Any, **kwargs: Any):
    """Drop-in for ``torchtitan.components.validate.build_validator`` (same
    arguments) whose validation dataloader understands ``"slimtrain"``.

    torchtitan's ``Validator.__init__`` calls the module-level
    ``build_text_validation_dataloader`` directly, so it is swapped for ours while
    the validator is constructed (ours delegates other dataset names back)."""
    from torchtitan.components import validate

    with _validator_uses_corpus_loader():
        return validate.build_validator(*args, **kwargs)
