"""Tables (markdown, JSON, CSV) and plots (PNG) of a sweep.

Per recipe the best learning rate (lowest final validation loss, else train loss) is reported;
every run, failed ones included, stays in the JSON and CSV.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

COLUMNS = (
    "recipe", "lr", "status", "ended", "val_perplexity", "val_loss", "final_train_loss", "tokens_per_s",
    "peak_memory_gib", "weights_optimizer_measured_gib", "weights_optimizer_estimated_gib",
    "train_flops", "tokens", "wall_s", "command", "error",
)


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def best_per_recipe(rows: list[dict]) -> list[dict]:
    best: dict[str, dict] = {}
    for row in rows:
        key = row["recipe"]
        score = _score(row)
        if key not in best or score < _score(best[key]):
            best[key] = row
    order = list(dict.fromkeys(r["recipe"] for r in rows))
    return [best[k] for k in order]


def _score(row: dict) -> float:
    if row["status"] != "ok":
        return math.inf
    for key in ("val_loss", "final_train_loss"):
        v = row.get(key, math.nan)
        if isinstance(v, float) and not math.isnan(v):
            return v
    return math.inf


def markdown_table(rows: list[dict], header: str = "") -> str:
    cols = ("recipe", "lr", "status", "val_perplexity", "final_train_loss", "tokens_per_s", "peak_memory_gib",
            "weights_optimizer_measured_gib", "weights_optimizer_estimated_gib", "train_flops", "wall_s")
    lines = [header] if header else []
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['error'][:120]}"
        cells = [_fmt(r.get(c, "")) if c != "status" else status for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_tables(rows: list[dict], out: Path, header: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    best = best_per_recipe(rows)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "md": out / "results.md"}
    paths["json"].write_text(json.dumps({"best": best, "runs": rows}, indent=2, default=str))
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    md = [header, "", "## Best learning rate per recipe", "", markdown_table(best), ""]
    if len(rows) > len(best):
        md += ["## Every run", "", markdown_table(rows), ""]
    md += ["## Commands", ""] + [f"- `{r['recipe']}` lr {r['lr']}: `{r['command']}`" for r in rows]
    paths["md"].write_text("\n".join(md) + "\n")
    return paths


def write_plots(rows: list[dict], curves: dict[str, list[tuple[float, float]]], out: Path) -> list[Path]:
    """Validation loss against tokens (best run per recipe), perplexity against memory and FLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    best = [r for r in best_per_recipe(rows) if r["status"] == "ok"]
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in best:
        pts = curves.get(r["run"], [])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=f"{r['recipe']} (lr {r['lr']})")
    ax.set_xlabel("tokens")
    ax.set_ylabel("validation loss")
    ax.set_title("Validation loss against tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "val_loss_vs_tokens.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    for x_key, x_label, name in (
        ("weights_optimizer_estimated_gib", "weights + optimizer state, analytic (GiB)", "ppl_vs_memory.png"),
        ("train_flops", "training FLOPs", "ppl_vs_flops.png"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for r in best:
            x, y = r.get(x_key, math.nan), r.get("val_perplexity", math.nan)
            if not (math.isnan(x) or math.isnan(y)):
                ax.scatter([x], [y])
                ax.annotate(r["recipe"], (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(x_label)
        ax.set_ylabel("validation perplexity")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
