"""Figure functions: each takes plain data and returns a matplotlib ``Figure``.

No I/O and no ``plt.show()`` here: notebooks display the figure and save it through
:func:`purifylib.reports.save_figure`.
"""

from __future__ import annotations


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def training_curves(curves: dict[str, list[float]], *, title: str = "Training loss", smooth: int = 20):
    """Loss per step for each named run (moving average over ``smooth`` steps), log-scaled."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in curves.items():
        if losses:
            ax.plot(range(1, len(losses) + 1), _smooth(losses, smooth), label=name, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (response tokens)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def attack_bars(df, *, metrics=("asr", "false_trigger", "off_trigger", "clean_accuracy"), title: str = ""):
    """Grouped bars of rate metrics (columns of ``df``) per model (``df['model']``)."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(df)), 4))
    x = np.arange(len(df))
    width = 0.8 / len(metrics)
    for k, m in enumerate(metrics):
        ax.bar(x + (k - (len(metrics) - 1) / 2) * width, 100 * df[m].to_numpy(), width, label=m)
    ax.set_xticks(x, df["model"], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def window_heatmaps(grids: dict, *, title: str = ""):
    """ASR over (start block, k) for MLP reversion; one panel per named grid (start, k, asr)."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(grids), figsize=(4.2 * len(grids), 3.6), squeeze=False)
    for ax, (name, df) in zip(axes[0], grids.items()):
        n = int(df["k"].max())
        mat = np.full((n, n), np.nan)
        for r in df.itertuples():
            mat[r.k - 1, r.start] = 100 * r.asr
        im = ax.imshow(mat, origin="lower", vmin=0, vmax=100, cmap="magma", aspect="auto")
        ax.set_xticks(range(n))
        ax.set_yticks(range(n), range(1, n + 1))
        ax.set_xlabel("first reverted block")
        ax.set_ylabel("k (consecutive blocks)")
        ax.set_title(name, fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), label="ASR %", shrink=0.9)
    fig.suptitle(title)
    return fig


def layer_lines(df, *, x: str = "layer", y: str = "asr", hue: str = "part", style: str | None = "mode",
                title: str = "", ylabel: str = "ASR %", scale: float = 100.0):
    """One line per (hue, style) over layers: e.g. ASR under per-layer activation ablation."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    keys = [hue] + ([style] if style else [])
    dashes = {v: ls for v, ls in zip(sorted(df[style].unique()), ("-", "--", ":", "-."))} if style else {}
    for key, g in df.groupby(keys):
        key = key if isinstance(key, tuple) else (key,)
        ax.plot(g[x], scale * g[y], marker="o", ms=3, label=" / ".join(map(str, key)),
                ls=dashes.get(key[-1], "-") if style else "-")
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
