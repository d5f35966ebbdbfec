"""Data and tokenizer wiring: the embedded default corpus unless the TOML names another dataset.

``[training] dataset = "slimtrain"`` (the recipes' default) means the embedded corpus of
``slimtrain.corpus``: ``prepare_run_data`` (called by the trainer on every rank before
torch.distributed starts) runs ``ensure_corpus``, which prepares the corpus on the first run under
a file lock (the first rank prepares, the others wait, later runs find it ready), and points
``training.dataset_path``, ``validation.dataset_path`` and ``model.hf_assets_path`` at the prepared
folder unless the TOML set them. The tokenizer's vocabulary is prepared at the flavor's vocab size.

Any other dataset name goes to torchtitan's own HuggingFace text loaders unchanged (e.g.
``dataset = "c4_test"`` with ``dataset_path`` a local folder of jsonl/parquet/txt files).

The tokenizer builder checks the tokenizer's vocabulary against the flavor's embedding size:
torchtitan's llama3 does not take vocab_size from the tokenizer, and a larger tokenizer would crash
mid-step in the embedding gather (a device-side assert on GPU).
"""

from __future__ import annotations

import logging
from pathlib import Path

from slimtrain.titan_integration import cpu_shim

cpu_shim.apply()

from torchtitan.components.tokenizer import build_hf_tokenizer  # noqa: E402

log = logging.getLogger("slimtrain")

CORPUS_DATASET = "slimtrain"
TITAN_DEFAULT_ASSETS = "./tests/assets/tokenizer"  # torchtitan's default model.hf_assets_path


class VocabularyError(ValueError):
    """The tokenizer has more tokens than the model's embedding."""


def _corpus_dataset_module():
    from slimtrain.titan_integration import corpus_dataset as dataset  # the corpus as torchtitan loaders

    return dataset


def _is_corpus(name: str) -> bool:
    return name.lower() in _corpus_dataset_module().DATASET_NAMES


def uses_corpus(job_config) -> bool:
    return _is_corpus(job_config.training.dataset) or (
        job_config.validation.enable and _is_corpus(job_config.validation.dataset)
    )


def prepare_run_data(job_config, vocab_size: int) -> Path | None:
    """Prepare the embedded corpus when the run uses it and fill in the paths that point to it."""
    if not uses_corpus(job_config):
        return None
    from slimtrain.corpus import ensure_corpus

    data_dir = job_config.slimtrain.data_dir or None
    folder = Path(ensure_corpus(data_dir, vocab_size=vocab_size))
    if _is_corpus(job_config.training.dataset) and not job_config.training.dataset_path:
        job_config.training.dataset_path = str(folder)
    if _is_corpus(job_config.validation.dataset) and not job_config.validation.dataset_path:
        job_config.validation.dataset_path = str(folder)
    if job_config.model.hf_assets_path in ("", TITAN_DEFAULT_ASSETS, None):
        job_config.model.hf_assets_path = str(folder)
    log.info("slimtrain: embedded corpus ready at %s (vocab %d)", folder, vocab_size)
    return folder


def build_dataloader(dp_world_size: int, dp_rank: int, tokenizer, job_config, infinite: bool = True):
    """torchtitan ``build_dataloader_fn``: the corpus's train split for ``"slimtrain"``, else
    torchtitan's own text loader (the corpus builder dispatches on the dataset name)."""
    return _corpus_dataset_module().build_text_dataloader(
        dp_world_size=dp_world_size, dp_rank=dp_rank, tokenizer=tokenizer,
        job_config=job_config, infinite=infinite,
    )


def build_validation_dataloader(dp_world_size: int, dp_rank: int, tokenizer, job_config, infinite: bool = False):
    """The corpus's held-out split for ``"slimtrain"``, else torchtitan's validation loader."""
    return _corpus_dataset_module().build_text_validation_dataloader(
        dp_world_size=dp_world_size, dp_rank=dp_rank, tokenizer=tokenizer,
        job_config=job_config, infinite=infinite,
    )


def check_vocab(tokenizer, model_vocab: int, flavor: str, assets: str) -> None:
    n = tokenizer.get_vocab_size()
    if n > model_vocab:
        raise VocabularyError(
            f"the tokenizer at {assets} has {n} tokens but flavor {flavor!r} has vocab_size "
            f"{model_vocab}: token ids >= {model_vocab} would index past the embedding. Use a "
            f"tokenizer with at most {model_vocab} tokens or a flavor with a larger vocabulary"
        )
    if n < model_vocab:
        log.info("tokenizer has %d tokens, flavor %s embeds %d (the rest stay unused)", n, flavor, model_vocab)


def make_tokenizer_builder(flavors):
    def build_tokenizer(job_config):
        """torchtitan ``build_tokenizer_fn``: the HF tokenizer, checked against the flavor."""
        tokenizer = build_hf_tokenizer(job_config)
        flavor = job_config.model.flavor
        check_vocab(tokenizer, flavors[flavor].vocab_size, flavor, job_config.model.hf_assets_path)
        return tokenizer

    return build_tokenizer
