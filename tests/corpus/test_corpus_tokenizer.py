"""Tokenizer: byte-identical retraining, loadable by torchtitan, <bos> doc <eos> framing."""

from __future__ import annotations

import random

import numpy as np
import pytest

from slimtrain.corpus import tokenizer as tkn

from .fakes import prose


def _texts(seed=0, n=30):
    rng = random.Random(seed)
    return [prose(rng, 3) + "\n\tcode(x) -> 42; café naïve" for _ in range(n)]


def _train_and_save(tmp_path, name, vocab=300):
    out = tmp_path / name
    out.mkdir()
    tkn.save_tokenizer(tkn.train_tokenizer(_texts(), vocab), out)
    return out


def test_retraining_is_byte_identical(tmp_path):
    a = _train_and_save(tmp_path, "a")
    b = _train_and_save(tmp_path, "b")
    for name in (tkn.TOKENIZER_FILE, tkn.TOKENIZER_CONFIG_FILE):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    other = _train_and_save(tmp_path, "c", vocab=290)
    assert (other / tkn.TOKENIZER_FILE).read_bytes() != (a / tkn.TOKENIZER_FILE).read_bytes()


def test_vocab_size_and_special_ids(tmp_path):
    tok = tkn.train_tokenizer(_texts(), 300)
    assert tok.get_vocab_size() == 300
    assert tok.token_to_id(tkn.BOS_TOKEN) == 0 and tok.token_to_id(tkn.EOS_TOKEN) == 1
    with pytest.raises(ValueError):
        tkn.train_tokenizer(_texts(), 100)


def test_torchtitan_loads_it(tmp_path):
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    folder = _train_and_save(tmp_path, "t")
    t = HuggingFaceTokenizer(str(folder))
    assert (t.bos_id, t.eos_id) == (0, 1)
    assert t.get_vocab_size() == 300
    text = "Unseen bytes: ∑ 😀 and\ttabs\n"
    ids = t.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == 0 and ids[-1] == 1 and 0 not in ids[1:-1] and 1 not in ids[1:-1]
    assert t.decode(ids[1:-1]) == text  # byte level: lossless on any text


def test_encode_documents_framing_and_dtype(tmp_path):
    folder = _train_and_save(tmp_path, "t")
    tok = tkn.load_tokenizer(folder)
    docs = ["first document", "second one", "third"]
    n = tkn.encode_documents(tok, iter(docs), tmp_path / "x.bin", batch_docs=2)
    arr = np.fromfile(tmp_path / "x.bin", dtype=np.uint16)
    assert arr.size == n
    expected = []
    for d in docs:
        expected += [0] + tok.encode(d, add_special_tokens=False).ids + [1]
    assert arr.tolist() == expected
    assert tkn.token_dtype(65536) == np.uint16 and tkn.token_dtype(65537) == np.uint32
