"""Tiny, offline test assets: a folder of jsonl text and a small byte-level BPE tokenizer.

Used with torchtitan's ``c4_test`` local-folder dataset when a test must not depend on the
embedded corpus (which fetches its sources from package registries on first use).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

_WORDS = (
    "the a one every some old new small large quick slow bright dark model layer weight rank "
    "matrix vector gradient optimizer step loss token memory sparse dense factor update learns "
    "trains grows moves holds keeps reads writes and but then so because while when if river "
    "mountain city garden window door light music story ship star cloud rain sun moon"
).split()


def _sentence(rng: random.Random) -> str:
    n = rng.randint(5, 14)
    words = [rng.choice(_WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + rng.choice([".", ".", ".", "!", "?"])


def make_text_folder(folder: Path, n_docs: int = 400, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with open(folder / "train.jsonl", "w") as f:
        for _ in range(n_docs):
            text = " ".join(_sentence(rng) for _ in range(rng.randint(4, 12)))
            f.write(json.dumps({"text": text}) + "\n")
    return folder


def make_tokenizer(folder: Path, text_folder: Path, vocab_size: int = 512) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    texts = [json.loads(line)["text"] for line in open(text_folder / "train.jsonl")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})
    )
    return folder


def make_assets(root: Path, vocab_size: int = 512) -> tuple[Path, Path]:
    text = make_text_folder(root / "text")
    tok = make_tokenizer(root / "tokenizer", text, vocab_size)
    return text, tok
