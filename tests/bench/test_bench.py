"""``slimtrain bench`` and ``slimtrain memory`` as a user runs them (CPU, nano flavor)."""

from __future__ import annotations

import csv
import json
import math

import pytest

from slimtrain.bench import cli as bench_cli
from slimtrain.bench import memory as memory_cli

# Published 1B figures (GaLore and SLTrain papers, as the benchmark paper reproduces them): weights + AdamW moments, bf16, GB.
PUBLISHED_1B = {
    "full_rank": 8.03,
    "galore": 4.76,
    "fira": 4.76,
    "low_rank": 3.66,
    "sltrain": 3.87,
    "sltrain_restarts": 3.87,
    "lora": 6.07,
    "relora": 6.07,
}


@pytest.mark.parametrize("recipe", sorted(PUBLISHED_1B))
def test_memory_table_reproduces_published_1b_figures(recipe):
    row = memory_cli.memory_row(recipe, "1b")
    assert row["total_gb"] == pytest.approx(PUBLISHED_1B[recipe], rel=0.02)
    if recipe.startswith("sltrain"):
        assert row["extra_gb"] == pytest.approx(0.29, abs=0.01)  # the int64 support index


def test_memory_cli_prints_a_row_per_recipe(capsys):
    assert memory_cli.main(["--flavor", "60m", "--recipes", "full_rank,low_rank"]) == 0
    out = capsys.readouterr().out
    assert "| full_rank | adamw |" in out and "| low_rank | low_rank + adamw |" in out


def test_memory_cli_unknown_recipe(capsys):
    assert memory_cli.main(["--recipes", "nope"]) == 2
    assert "unknown recipe 'nope'; available:" in capsys.readouterr().err


def _image_has_content(path) -> bool:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    return img.ndim == 3 and img.shape[0] > 100 and float(img[..., :3].std()) > 0.01


@pytest.mark.integration
def test_two_recipe_sweep_writes_tables_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = bench_cli.main([
        "--recipes", "full_rank,sltrain", "--flavor", "nano", "--steps", "8", "--batch", "4",
        "--seq-len", "64", "--val-every", "4", "--val-steps", "2", "--lr", "1e-4,3e-3", "--out", str(out),
    ])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert [(r["recipe"], r["lr"]) for r in data["runs"]] == [
        ("full_rank", 1e-4), ("full_rank", 3e-3), ("sltrain", 1e-4), ("sltrain", 3e-3)
    ]
    best = {r["recipe"]: r for r in data["best"]}
    assert set(best) == {"full_rank", "sltrain"}
    for recipe, row in best.items():
        assert row["status"] == "ok", row["error"]
        # the best run per recipe is the one with the lowest final validation loss
        runs = [r for r in data["runs"] if r["recipe"] == recipe]
        assert row["val_loss"] == min(r["val_loss"] for r in runs)
        curve = row["val_curve"]
        assert [t for t, _ in curve] == [256, 4 * 256, 8 * 256]  # validated at steps 1, 4, 8
        assert curve[-1][1] < curve[0][1]  # validation loss falls
        assert row["val_perplexity"] == pytest.approx(math.exp(curve[-1][1]), rel=1e-4)
        assert math.isfinite(row["final_train_loss"]) and row["tokens_per_s"] > 0
        assert row["tokens"] == 8 * 4 * 64
        # measured weights + optimizer state agree with the analytic estimate (fp32 on CPU)
        assert row["weights_optimizer_measured_gib"] == pytest.approx(row["weights_optimizer_estimated_gib"], rel=0.02)
        assert "--job.config_file" in row["command"]
    # SLTrain holds less than full rank but computes densely (it materializes W), so equal FLOPs
    assert best["sltrain"]["weights_optimizer_estimated_gib"] < best["full_rank"]["weights_optimizer_estimated_gib"]
    assert best["sltrain"]["train_flops"] == pytest.approx(best["full_rank"]["train_flops"])
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["recipe"] for r in rows] == ["full_rank", "full_rank", "sltrain", "sltrain"]
    md = (out / "results.md").read_text()
    assert "## Best learning rate per recipe" in md and "## Every run" in md
    assert f"| full_rank | {best['full_rank']['lr']:g} | ok |" in md
    for name in ("val_loss_vs_tokens.png", "ppl_vs_memory.png", "ppl_vs_flops.png"):
        assert _image_has_content(out / name), name


@pytest.mark.integration
def test_failed_recipe_is_reported_and_sweep_goes_on(tmp_path):
    out = tmp_path / "bench"
    # rank 64 does not fit nano's 32-wide weights: sltrain fails before any model, full_rank trains
    rc = bench_cli.main([
        "--recipes", "sltrain,full_rank", "--flavor", "nano", "--steps", "2", "--batch", "2",
        "--seq-len", "32", "--val-steps", "1", "--rank", "64", "--out", str(out),
    ])
    assert rc == 0
    runs = {r["recipe"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert runs["sltrain"]["status"] == "failed"
    assert "[sltrain] rank = 64 does not fit" in runs["sltrain"]["error"]
    assert runs["full_rank"]["status"] == "ok"
    assert "failed: slimtrain: error: [sltrain] rank = 64" in (out / "results.md").read_text()


def test_unknown_recipe_is_refused_before_running(tmp_path, capsys):
    assert bench_cli.main(["--recipes", "full_rank,nope", "--out", str(tmp_path)]) == 2
    assert "unknown recipe(s) nope" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    "recipe, flavor, expected",
    [
        ("sltrain_restarts", "1b", {"sltrain": {"rank": 512, "alpha": 8.0}}),
        ("sltrain", "130m", {"sltrain": {"rank": 256, "alpha": 16.0}}),
        ("fira", "1b", {"fira": {"rank": 512, "scale": 0.0625}}),
        ("galore", "60m", {"galore": {"rank": 128}}),
        ("full_rank", "1b", {}),
    ],
)
def test_runs_at_a_paper_size_take_that_sizes_settings(recipe, flavor, expected):
    assert bench_cli.method_overrides(recipe, flavor, None) == expected


def test_memory_of_a_toml_path_uses_its_values_and_says_so(tmp_path, capsys):
    toml = tmp_path / "my_sltrain.toml"
    toml.write_text('[slimtrain]\nmethods = ["sltrain"]\n[sltrain]\nrank = 64\n')
    mine = memory_cli.memory_row(str(toml), "1b")
    paper = memory_cli.memory_row("sltrain", "1b")
    assert mine["settings"]["sltrain.rank"] == 64 and paper["settings"]["sltrain.rank"] == 512
    assert mine["trainable_params"] < paper["trainable_params"]
    assert mine["differs_from_paper"]["sltrain.rank"] == {"used": 64, "paper": 512}
    assert not paper["differs_from_paper"]
    assert memory_cli.main(["--flavor", "1b", "--recipes", f"sltrain,{toml}"]) == 0
    out = capsys.readouterr().out
    assert "my_sltrain: its TOML's values: sltrain.rank = 64" in out
    assert "sltrain.rank 64 (paper: 512)" in out
    assert "sltrain: the paper's values at this size: sltrain.rank = 512" in out
