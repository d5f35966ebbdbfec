"""The torchtitan dataset over token files: shapes, exact resume, dp sharding, builders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimtrain.titan_integration import corpus_dataset as cds

from .conftest import SMALL_VOCAB

SEQ = 8


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "train.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)  # token value == position
    return path


def _starts(samples):
    return [int(x["input"][0]) for x, _ in samples]


def test_samples_are_shifted_windows(token_file):
    ds = cds.TokenFileDataset(token_file, SEQ, dtype="uint16")
    samples = list(ds)
    assert len(samples) == len(ds) == (1000 - 1) // SEQ
    for x, y in samples:
        assert x["input"].shape == y.shape == (SEQ,)
        assert x["input"].dtype == y.dtype == torch.int64
        assert torch.equal(y[:-1], x["input"][1:])
        assert int(y[-1]) == int(x["input"][-1]) + 1
    assert _starts(samples) == [k * SEQ for k in range(len(samples))]


@pytest.mark.parametrize("shuffle,infinite", [(False, False), (True, True)])
def test_exact_resume_from_state_dict(token_file, shuffle, infinite):
    make = lambda: cds.TokenFileDataset(token_file, SEQ, infinite=infinite, shuffle=shuffle,
                                        dtype="uint16")
    n = 300 if infinite else len(make())  # the infinite case crosses epoch boundaries
    reference = [s for _, s in zip(range(n), make())]
    for cut in (0, 1, 57, n // 2, n - 1):
        ds = make()
        it = iter(ds)
        head = [next(it) for _ in range(cut)]
        state = ds.state_dict()
        fresh = make()
        fresh.load_state_dict(state)
        tail = [s for _, s in zip(range(n - cut), fresh)]
        assert _starts(head + tail) == _starts(reference)
    if shuffle:  # each epoch is a different permutation of all windows
        per = len(make())
        e0, e1 = _starts(reference[:per]), _starts(reference[per:2 * per])
        assert e0 != e1 and sorted(e0) == sorted(e1) == [k * SEQ for k in range(per)]


def test_resume_through_torchtitan_dataloader(token_file):
    from torchtitan.components.dataloader import ParallelAwareDataloader

    def make():
        ds = cds.TokenFileDataset(token_file, SEQ, dp_rank=1, dp_world_size=2, infinite=True,
                                  shuffle=True, dtype="uint16")
        return ParallelAwareDataloader(ds, dp_rank=1, dp_world_size=2, batch_size=4)

    dl = make()
    it = iter(dl)
    for _ in range(5):
        next(it)
    state = dl.state_dict()
    expected = [next(it)[1] for _ in range(20)]
    dl2 = make()
    dl2.load_state_dict(state)
    got = [b for _, (_, b) in zip(range(20), dl2)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_dp_shards_are_disjoint_equal_and_deterministic(token_file, world):
    for shuffle in (False, True):
        shards = [_starts(cds.TokenFileDataset(token_file, SEQ, dp_rank=r, dp_world_size=world,
                                               shuffle=shuffle, dtype="uint16"))
                  for r in range(world)]
        again = [_starts(cds.TokenFileDataset(token_file, SEQ, dp_rank=r, dp_world_size=world,
                                              shuffle=shuffle, dtype="uint16"))
                 for r in range(world)]
        assert shards == again
        sizes = {len(s) for s in shards}
        assert sizes == {((1000 - 1) // SEQ) // world}
        flat = [x for s in shards for x in s]
        assert len(flat) == len(set(flat))
    with pytest.raises(ValueError):
        cds.TokenFileDataset(token_file, SEQ, dp_rank=world, dp_world_size=world)


def test_validation_pass_restarts_and_is_finite(token_file):
    ds = cds.TokenFileDataset(token_file, SEQ, restart_each_pass=True, dtype="uint16")
    first = _starts(ds)
    assert first == _starts(ds) and len(first) == len(ds)
    train = cds.TokenFileDataset(token_file, SEQ, dtype="uint16")
    assert len(list(train)) == len(train)
    state = train.state_dict()  # a finished pass leaves the state at the next epoch's start
    assert (state["epoch"], state["pos"]) == (1, 0)


def test_resume_rejects_changed_geometry(token_file):
    state = cds.TokenFileDataset(token_file, SEQ, dtype="uint16").state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        cds.TokenFileDataset(token_file, SEQ * 2, dtype="uint16").load_state_dict(state)


def test_worker_processes_split_the_rank_windows(token_file):
    from torchtitan.components.dataloader import ParallelAwareDataloader

    ds = cds.TokenFileDataset(token_file, SEQ, dtype="uint16")
    dl = ParallelAwareDataloader(ds, dp_rank=0, dp_world_size=1, batch_size=None,
                                 num_workers=2)
    starts = sorted(int(x["input"][0]) for x, _ in dl)
    assert starts == [k * SEQ for k in range(len(ds))]


def _job_config(folder, seq_len=16):
    from torchtitan.config import JobConfig

    jc = JobConfig()
    jc.training.dataset = "slimtrain"
    jc.training.seq_len = seq_len
    jc.training.local_batch_size = 4
    jc.validation.dataset = "slimtrain"
    jc.validation.seq_len = seq_len
    jc.validation.local_batch_size = 4
    jc.model.hf_assets_path = str(folder)
    return jc


def test_builders_on_prepared_corpus(small_corpus):
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    data_dir, result = small_corpus
    tok = HuggingFaceTokenizer(str(result.path))
    jc = _job_config(result.path)
    x, y = next(iter(cds.build_text_dataloader(1, 0, tok, jc)))
    assert x["input"].shape == y.shape == (4, 16)
    assert int(x["input"].max()) < SMALL_VOCAB
    val = cds.build_text_validation_dataloader(1, 0, tok, jc)
    val_tokens = result.manifest["splits"]["val"]["tokens"]
    n = sum(b.numel() for _, b in val)
    assert n == ((val_tokens - 1) // 16) * 16  # the whole split, once
    assert sum(b.numel() for _, b in val) == n  # and again on the next evaluation
    # dataset_path may name the data directory; the vocab folder is found inside it
    jc.training.dataset_path = str(data_dir)
    jc.model.hf_assets_path = ""
    assert next(iter(cds.build_text_dataloader(1, 0, tok, jc)))[1].shape == (4, 16)
    # first tokens of the train split decode to the first train document
    ds = cds.build_corpus_dataset(1, 0, tok, str(result.path), 16, "val", False)
    first = next(iter(ds))[0]["input"].tolist()
    assert first[0] == tok.bos_id


def test_builder_refuses_other_tokenizer(small_corpus, tmp_path):
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    from slimtrain.corpus import tokenizer as tkn

    _, result = small_corpus
    other = tmp_path / "other"
    other.mkdir()
    tkn.save_tokenizer(tkn.train_tokenizer(["some other text entirely"] * 5, 300), other)
    jc = _job_config(result.path)
    jc.training.dataset_path = str(result.path)
    with pytest.raises(ValueError, match="not the one"):
        cds.build_text_dataloader(1, 0, HuggingFaceTokenizer(str(other)), jc)


def test_other_dataset_names_go_to_torchtitan(monkeypatch):
    calls = []
    monkeypatch.setattr(cds._titan_text, "build_text_dataloader",
                        lambda **kw: calls.append(("train", kw)) or "titan")
    monkeypatch.setattr(cds._titan_text, "build_text_validation_dataloader",
                        lambda **kw: calls.append(("val", kw)) or "titan-val")
    jc = _job_config("/nonexistent")
    jc.training.dataset = "c4_test"
    jc.validation.dataset = "c4_validation"
    assert cds.build_dataloader(2, 1, None, jc) == "titan"
    assert cds.build_validation_dataloader(2, 1, None, jc) == "titan-val"
    assert [c[0] for c in calls] == ["train", "val"]
    assert calls[0][1]["dp_rank"] == 1 and calls[0][1]["infinite"] is True


def test_validator_builder_uses_corpus_loader_only_while_building(monkeypatch):
    from torchtitan.components import validate

    original = validate.build_text_validation_dataloader
    seen = []
    monkeypatch.setattr(validate, "build_validator",
                        lambda *a, **k: seen.append(validate.build_text_validation_dataloader)
                        or ("validator", a, k))
    out = cds.build_corpus_validator(1, job_config="jc")
    assert out == ("validator", (1,), {"job_config": "jc"})
    assert seen == [cds.build_text_validation_dataloader]
    assert validate.build_text_validation_dataloader is original


def _copy_corpus(result, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(result.path, folder)
    return folder


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_token_file_is_refused_by_name(small_corpus, tmp_path, damage):
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    from slimtrain.corpus.prepare import CorpusError

    _, result = small_corpus
    folder = _copy_corpus(result, tmp_path)
    tok = HuggingFaceTokenizer(str(folder))
    jc = _job_config(folder)
    jc.training.dataset_path = str(folder)
    assert next(iter(cds.build_text_dataloader(1, 0, tok, jc)))[1].shape == (4, 16)  # intact: loads
    data = bytearray((folder / "train.bin").read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    else:
        data = data[: len(data) - 6]
    (folder / "train.bin").write_bytes(bytes(data))
    why = "does not match its recorded hash" if damage == "flip" else r"has \d+ bytes, its manifest records \d+"
    with pytest.raises(CorpusError, match=rf"train token file is damaged: .*train\.bin {why}"):
        cds.build_text_dataloader(1, 0, tok, jc)


def test_a_token_file_without_manifest_is_checked_against_the_vocabulary(small_corpus, tmp_path):
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    from slimtrain.corpus.prepare import CorpusError

    _, result = small_corpus
    folder = _copy_corpus(result, tmp_path)
    (folder / "manifest.json").unlink()
    tok = HuggingFaceTokenizer(str(folder))
    assert len(cds.build_corpus_dataset(1, 0, tok, str(folder), 16, "train", False)) > 0
    tokens = np.memmap(folder / "train.bin", dtype=np.uint16, mode="r+")
    tokens[7] = SMALL_VOCAB + 3
    tokens.flush()
    del tokens
    with pytest.raises(CorpusError, match=rf"holds token id {SMALL_VOCAB + 3}, outside the tokenizer's "
                                          rf"vocabulary of {tok.get_vocab_size()}"):
        cds.build_corpus_dataset(1, 0, tok, str(folder), 16, "train", False)
