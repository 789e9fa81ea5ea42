"""Training plots for MLflow and Dagster metadata (matplotlib, Agg backend: no display needed).

Input is the JSON-lines metrics file the launcher writes (one ``{"kind", "step", <metric>...}``
object per line). Plots: losses, rewards and KL over steps, and reward against sqrt(KL) -- the
frontier Gao et al. 2022 ("Scaling Laws for Reward Model Overoptimization") plot reward on,
since gold reward is roughly a function of sqrt(KL) distance from the initial policy.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

# Name fragments that pick which metrics go on which plot (engines namespace their metrics).
LOSS_KEYS = ("loss",)
REWARD_KEYS = ("reward", "score")
KL_KEYS = ("kl",)


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of the metrics file; missing file -> [] (a stage that logged nothing has no plots)."""
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for i, line in enumerate(p.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{p}: line {i} is not JSON ({exc.msg})") from exc
    return rows


def series(rows: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, finite values only."""
    pts = [(int(r["step"]), float(r[key])) for r in rows
           if key in r and isinstance(r[key], (int, float)) and math.isfinite(float(r[key]))]
    return [s for s, _ in pts], [v for _, v in pts]


def metric_keys(rows: Sequence[dict], fragments: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k in ("kind", "step", "time") or k in keys:
                continue
            low = k.lower()
            if any(f in low for f in fragments) and not any(e in low for e in exclude):
                keys.append(k)
    return sorted(keys)


def _line_plot(rows: Sequence[dict], keys: Sequence[str], title: str, out: Path) -> Path | None:
    drawn = False
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=90)
    for k in keys:
        steps, vals = series(rows, k)
        if steps:
            ax.plot(steps, vals, label=k, marker="." if len(steps) < 30 else None)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_title(title)
    ax.set_xlabel("step")
    return _save(fig, ax, out)


def _save(fig: Any, ax: Any, out: Path) -> Path:
    """Grid, legend, tight layout; write the PNG and free the figure."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def frontier_plot(rows: Sequence[dict], reward_key: str, kl_key: str, out: Path) -> Path | None:
    """Reward against sqrt(max(KL, 0)), points coloured by step."""
    pts = [(r["step"], float(r[kl_key]), float(r[reward_key])) for r in rows
           if reward_key in r and kl_key in r
           and math.isfinite(float(r[kl_key])) and math.isfinite(float(r[reward_key]))]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(5, 4), dpi=90)
    sc = ax.scatter([math.sqrt(max(kl, 0.0)) for _, kl, _ in pts], [rw for _, _, rw in pts],
                    c=[s for s, _, _ in pts], cmap="viridis", s=12)
    fig.colorbar(sc, ax=ax, label="step")
    ax.set_xlabel(f"sqrt({kl_key})")
    ax.set_ylabel(reward_key)
    ax.set_title("reward vs sqrt(KL)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


GUARD_CURVES = (("proxy", "proxy reward (trained on)"), ("heldout", "held-out reward (selects)"),
                ("gold", "gold reward (reported only)"))


def guard_points(rows: Sequence[dict]) -> list[dict]:
    """The over-optimization guard's evaluations from a metrics file: step, KL per response,
    proxy and held-out scores (ppo_core.ppo logs them as ``guard/...`` evaluation metrics)."""
    return [{"step": int(r["step"]), "kl": float(r["guard/kl_per_response"]),
             "proxy": float(r["guard/proxy"]), "heldout": float(r["guard/heldout"])}
            for r in rows if "guard/heldout" in r and "guard/kl_per_response" in r]


def guard_plot(points: Sequence[dict], out: Path, kept_step: int | None = None) -> Path | None:
    """Proxy, held-out and (when given) gold reward against sqrt(KL per response), one line
    each in step order, the kept checkpoint ringed: Gao et al. 2022's over-optimization picture."""
    points = sorted(points, key=lambda p: p["step"])
    if not points:
        return None
    x = [math.sqrt(max(p["kl"], 0.0)) for p in points]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=90)
    for key, label in GUARD_CURVES:
        ys = [p.get(key) for p in points]
        if all(isinstance(y, (int, float)) for y in ys):
            ax.plot(x, ys, marker=".", label=label)
            if kept_step is not None:
                for xi, p, y in zip(x, points, ys):
                    if p["step"] == kept_step:
                        ax.scatter([xi], [y], s=120, facecolors="none", edgecolors="black")
    ax.set_xlabel("sqrt(KL to the reference, nats per response)")
    ax.set_ylabel("mean score (each in its own units)")
    ax.set_title("over-optimization guard" + (f" (kept step {kept_step})" if kept_step is not None else ""))
    return _save(fig, ax, out)


def rounds_plot(rows: Sequence[dict], out: Path) -> Path | None:
    """Per RLHF round: champion and challenger gold, the refreshed reward model's agreement with
    gold and the challenger's KL to SFT (second axis); refused rounds marked with an x."""
    if not rows:
        return None
    xs = list(range(1, len(rows) + 1))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=90)
    for key, label in (("champion_gold", "champion gold (before)"), ("challenger_gold", "challenger gold"),
                       ("rm_gold_agreement", "RM agreement with gold")):
        ys = [r.get(key) for r in rows]
        if any(isinstance(y, (int, float)) for y in ys):
            ax.plot(xs, [y if isinstance(y, (int, float)) else float("nan") for y in ys], marker="o", label=label)
    refused = [(x, r.get("challenger_gold")) for x, r in zip(xs, rows)
               if not r.get("promoted") and isinstance(r.get("challenger_gold"), (int, float))]
    if refused:
        ax.scatter([x for x, _ in refused], [y for _, y in refused], marker="x", s=80, color="red", label="refused")
    kl = [r.get("challenger_kl_to_sft") for r in rows]
    if any(isinstance(k, (int, float)) for k in kl):
        ax2 = ax.twinx()
        ax2.plot(xs, [k if isinstance(k, (int, float)) else float("nan") for k in kl], "k--")
        ax2.set_ylabel("challenger KL to SFT (nats per response)")
        ax.plot([], [], "k--", label="challenger KL to SFT (right axis)")  # one legend for both axes
    ax.set_xticks(xs, [str(r.get("round", x)) for x, r in zip(xs, rows)], rotation=30)
    ax.set_xlabel("round")
    ax.set_title("RLHF rounds")
    return _save(fig, ax, out)


def _pick(keys: Sequence[str], preferred: Sequence[str]) -> str | None:
    for p in preferred:
        if p in keys:
            return p
    return keys[0] if keys else None


def training_plots(metrics_file: str | Path, out_dir: str | Path, kept_step: int | None = None) -> dict[str, Path]:
    """Write every plot the metrics allow; returns ``{name: png path}`` (names: loss, reward, kl,
    frontier, guard); ``kept_step`` rings the checkpoint the guard kept."""
    rows = read_metrics(metrics_file)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path | None] = {
        "loss": _line_plot(rows, metric_keys(rows, LOSS_KEYS), "losses", out / "loss.png"),
        "reward": _line_plot(rows, metric_keys(rows, REWARD_KEYS, exclude=("loss",)), "rewards",
                             out / "reward.png"),
        "kl": _line_plot(rows, metric_keys(rows, KL_KEYS, exclude=("loss", "coef")), "KL", out / "kl.png"),
    }
    reward_keys = metric_keys(rows, REWARD_KEYS, exclude=("loss", "std"))
    kl_keys = metric_keys(rows, KL_KEYS, exclude=("loss", "coef", "approx"))
    # TRL's PPO metric names first (objective/scores, objective/kl), then whatever the engine logs.
    reward_key = _pick(reward_keys, ("objective/scores", "objective/rlhf_reward", "env/reward_mean"))
    kl_key = _pick(kl_keys, ("objective/kl", "objective/kl_mean"))
    if reward_key and kl_key:
        plots["frontier"] = frontier_plot(rows, reward_key, kl_key, out / "reward_vs_sqrt_kl.png")
    guard = guard_points(rows)
    if guard:
        plots["guard"] = guard_plot(guard, out / "guard_vs_sqrt_kl.png", kept_step)
    return {k: v for k, v in plots.items() if v is not None}


def png_markdown(path: str | Path, alt: str = "plot") -> str:
    """Markdown with the PNG embedded as base64, for ``dg.MetadataValue.md`` (the UI shows it inline)."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"![{alt}](data:image/png;base64,{data})"
