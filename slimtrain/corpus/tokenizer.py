"""Training the corpus's byte-level BPE tokenizer and pre-tokenizing the splits.

No tokenizer can be downloaded here, so one is trained locally with HuggingFace
``tokenizers`` on the train split (never on validation, so validation perplexity
is honest).  Byte-level BPE has no unknown tokens, and the files written are the
ones ``torchtitan.components.tokenizer.HuggingFaceTokenizer`` reads from a folder:
``tokenizer.json`` (model, pre-tokenizer, decoder, special tokens) and
``tokenizer_config.json`` (where it finds ``bos_token``/``eos_token``).  Both are
written with sorted keys and no timestamps so the same corpus and settings give
byte-identical files.

Pre-tokenizing once into flat ``uint16``/``uint32`` files lets the training loader
read tokens at memory speed instead of tokenizing on the fly.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

log = logging.getLogger("slimtrain.corpus")

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN]  # ids 0 and 1
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
MIN_FREQUENCY = 2


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def train_tokenizer(texts: Iterable[str], vocab_size: int, length: int | None = None) -> Tokenizer:
    """Train byte-level BPE with ``vocab_size`` entries (special tokens included)."""
    min_vocab = len(SPECIAL_TOKENS) + 256
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size must be at least {min_vocab} (256 bytes + specials)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=MIN_FREQUENCY,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def tokenizer_config(vocab_size: int) -> dict:
    """The ``tokenizer_config.json`` contents torchtitan and transformers understand."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 1_000_000_000,
        "clean_up_tokenization_spaces": False,
        "vocab_size": vocab_size,
        "added_tokens_decoder": {
            str(i): {
                "content": t, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True,
            }
            for i, t in enumerate(SPECIAL_TOKENS)
        },
    }


def save_tokenizer(tok: Tokenizer, out_dir: Path) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` deterministically."""
    out_dir = Path(out_dir)
    data = json.loads(tok.to_str())
    (out_dir / TOKENIZER_FILE).write_text(
        json.dumps(data, ensure_ascii=False, sort_keys=True, separators=(",", ":")) + "\n",
        encoding="utf-8",
    )
    (out_dir / TOKENIZER_CONFIG_FILE).write_text(
        json.dumps(tokenizer_config(tok.get_vocab_size()), indent=2, sort_keys=True) + "\n",
        encoding="utf-8",
    )


def load_tokenizer(folder: Path) -> Tokenizer:
    return Tokenizer.from_file(str(Path(folder) / TOKENIZER_FILE))


def encode_documents(tok: Tokenizer, texts: Iterator[str], out_path: Path,
                     batch_docs: int = 512) -> int:
    """Write ``<bos> doc <eos>`` for every document, back to back, as a flat array.

    This is what torchtitan's HuggingFaceTextDataset feeds the model (it encodes
    each sample with ``add_bos=True, add_eos=True``), so models trained on either
    see the same framing.  Returns the number of tokens written.
    """
    bos, eos = tok.token_to_id(BOS_TOKEN), tok.token_to_id(EOS_TOKEN)
    dtype = token_dtype(tok.get_vocab_size())
    total = 0
    t0 = time.perf_counter()
    with open(out_path, "wb") as f:
        batch: list[str] = []

        def flush() -> None:
            nonlocal total
            if not batch:
                return
            encs = tok.encode_batch(batch, add_special_tokens=False)
            parts = []
            for enc in encs:
                parts.append(np.array([bos], dtype=dtype))
                parts.append(np.asarray(enc.ids, dtype=dtype))
                parts.append(np.array([eos], dtype=dtype))
            arr = np.concatenate(parts)
            f.write(arr.tobytes())
            total += arr.size
            batch.clear()

        for text in texts:
            batch.append(text)
            if len(batch) >= batch_docs:
                flush()
        flush()
    log.info("  wrote %s: %d tokens in %.1fs", out_path.name, total, time.perf_counter() - t0)
    return total
