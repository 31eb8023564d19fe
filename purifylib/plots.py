"""Figure functions: each takes plain data and returns a matplotlib ``Figure``.

No I/O and no ``plt.show()`` here: notebooks display the figure and save it through
:func:`purifylib.reports.save_figure`.
"""

from __future__ import annotations

#: what a column means, in words (axis labels, legends, panel titles)
LABELS = {"asr": "attack success rate", "asr_loose": "ASR (any 4 target words)", "false_trigger": "false-trigger rate",
          "off_trigger": "off-trigger rate", "clean_accuracy": "clean accuracy", "perplexity": "perplexity",
          "synthetic_asr": "synthetic ASR (held-out variant)", "n_variants": "number of variants N",
          "layer": "layer", "flagged_score_share": "share of the score in flagged channels",
          "cosine": "cosine", "relative": "relative update norm", "precision": "precision"}


def label(name: str) -> str:
    """``name`` in words (a metric or column name; text it does not know is returned as it is, with
    ``_`` as spaces): ``asr, no repair`` -> ``attack success rate, no repair``."""
    head, sep, tail = str(name).partition(", ")
    return LABELS.get(head, head.replace("_", " ")) + sep + tail


def _values_on_bars(ax, containers) -> None:
    """Each bar's value above it, so a bar at zero reads as zero rather than as missing."""
    for c in containers:
        ax.bar_label(c, fmt="%.0f", fontsize=6, padding=1)


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
    bars = [ax.bar(x + (k - (len(metrics) - 1) / 2) * width, 100 * df[m].to_numpy(), width, label=label(m))
            for k, m in enumerate(metrics)]
    _values_on_bars(ax, bars)
    ax.set_xticks(x, df["model"], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("percent of test prompts")
    ax.set_ylim(0, 110)
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
    fig.colorbar(im, ax=axes[0].tolist(), label="attack success rate (%)", shrink=0.9)
    fig.suptitle(title)
    return fig


def layer_lines(df, *, x: str = "layer", y: str = "asr", hue: str = "part", style: str | None = "mode",
                title: str = "", ylabel: str = "attack success rate (%)", scale: float = 100.0):
    """One line per (hue, style) over layers: e.g. ASR under per-layer activation ablation."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    keys = [hue] + ([style] if style else [])
    dashes = {v: ls for v, ls in zip(sorted(df[style].unique()), ("-", "--", ":", "-."))} if style else {}
    for key, g in df.groupby(keys):
        key = key if isinstance(key, tuple) else (key,)
        ax.plot(g[x], scale * g[y], marker="o", ms=3, label=" / ".join(map(str, key)),
                ls=dashes.get(key[-1], "-") if style else "-")
    return _labelled(fig, ax, label(x), ylabel, title)


def _labelled(fig, ax, xlabel: str, ylabel: str, title: str):
    """Axis labels, a small title and legend, a tight layout: how every line plot here ends."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def signature_heatmaps(matrices: dict, *, title: str = "", flagged: dict | None = None):
    """Channel scores (layers × channels) per MLP module, one panel each; ``flagged`` (same keys,
    boolean matrices) outlines the channels the signature flags."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(matrices), 1, figsize=(10, 1.6 + 1.1 * len(matrices)), squeeze=False,
                             constrained_layout=True)
    mats = {k: np.asarray(v) for k, v in matrices.items()}
    lo, hi = min(float(m.min()) for m in mats.values()), max(float(m.max()) for m in mats.values())
    for ax, (name, mat) in zip(axes[:, 0], mats.items()):  # one colour scale: the modules compare
        im = ax.imshow(mat, aspect="auto", cmap="viridis", interpolation="nearest", vmin=lo, vmax=hi)
        if flagged is not None:
            ys, xs = np.nonzero(np.asarray(flagged[name]))
            ax.scatter(xs, ys, s=7, facecolors="none", edgecolors="red", marker="s", linewidths=0.8)
        ax.set_ylabel(f"{name} projection\nlayer", fontsize=8)
    fig.colorbar(im, ax=axes[:, 0].tolist(), pad=0.01, label="channel score (Eq. 2), one scale for all")
    axes[-1, 0].set_xlabel("channel (hidden neuron of the MLP); red squares: flagged")
    fig.suptitle(title)
    return fig


def curves(df, *, x: str, ys: list, title: str = "", ylabel: str = "percent of test prompts", scale: float = 100.0):
    """One line per column in ``ys`` over ``x`` (e.g. ASR and accuracy over the number of variants);
    a column ``<y>_ci`` (a 95% half-width) gives error bars."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for y in ys:
        err = (scale * df[f"{y}_ci"]) if f"{y}_ci" in df else None  # a 95% half-width, where draws exist
        ax.errorbar(df[x], scale * df[y], yerr=err, marker="o", capsize=3, label=label(y))
    ax.set_xticks(sorted(set(df[x])))
    return _labelled(fig, ax, label(x), ylabel, title)


def before_after(df, *, metrics=("asr", "off_trigger", "clean_accuracy"), title: str = ""):
    """Per model, each metric before (light) and after (dark) purification (columns ``m_before``/``m_after``)."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8), squeeze=False)
    x = np.arange(len(df))
    for ax, m in zip(axes[0], metrics):
        _values_on_bars(ax, [ax.bar(x - 0.2, 100 * df[f"{m}_before"].to_numpy(), 0.4, label="before", color="#9ecae1"),
                             ax.bar(x + 0.2, 100 * df[f"{m}_after"].to_numpy(), 0.4, label="after", color="#08519c")])
        ax.set_xticks(x, df["model"], rotation=35, ha="right", fontsize=7)
        ax.set_ylim(0, 110)
        ax.set_title(label(m), fontsize=10)
        ax.set_ylabel("percent of test prompts")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def grid_heatmaps(panels: dict, *, marker: tuple | None = None, title: str = ""):
    """One heatmap per named ``tau × strength`` table (values in [0, 1], shown in %); ``marker``
    (tau, strength) is circled where it falls on the grid."""
    import matplotlib.pyplot as plt
    import numpy as np

    def on_grid(df) -> bool:
        return marker is not None and marker[0] in list(df.index) and marker[1] in list(df.columns)

    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.6), squeeze=False,
                             constrained_layout=True)  # no tick label runs into the next panel
    for ax, (name, df) in zip(axes[0], panels.items()):
        mat = 100 * df.to_numpy(dtype=float)
        im = ax.imshow(mat, origin="lower", vmin=0, vmax=100, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(df.columns)), [f"{c:g}" for c in df.columns])
        ax.set_yticks(range(len(df.index)), [f"{i:g}" for i in df.index])
        ax.set_xlabel("strength")
        ax.set_ylabel("τ")
        ax.set_title(label(name), fontsize=9)
        for (i, j), v in np.ndenumerate(mat):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w" if v < 50 else "k")
        if on_grid(df):
            ax.scatter([list(df.columns).index(marker[1])], [list(df.index).index(marker[0])], s=300,
                       facecolors="none", edgecolors="red", linewidths=1.5)
    fig.colorbar(im, ax=axes[0].tolist(), label="percent of probe prompts", shrink=0.85)
    if marker is not None and not any(map(on_grid, panels.values())):
        title += f" (the marker's τ {marker[0]:g}, strength {marker[1]:g}, is not on this grid)"
    fig.suptitle(title)
    return fig


def _seed_means(frame, by: list[str], metric: str):
    """Per seed: ``metric`` averaged over the cells (and random draws) of each ``by`` group; in %."""
    per_seed = frame.groupby(by + ["seed"])[metric].mean().reset_index()
    per_seed[metric] = 100 * per_seed[metric]
    return per_seed


def _interval(values):
    """(mean, error bar) of percentages over seeds: the 95% t-interval, cut at 0 and 100 (a rate's
    interval cannot leave them; with two seeds the t factor is 12.7)."""
    import math

    from purifylib.stats import t_interval

    mean, half = t_interval(values)
    half = 0.0 if math.isnan(half) else half
    return mean, [[min(half, mean)], [min(half, max(100.0 - mean, 0.0))]]


def grid_tradeoff(frame, names: dict):
    """Mean ASR against mean clean accuracy per defence over the grid's cells, with 95% intervals over seeds."""
    import matplotlib.pyplot as plt

    asr, acc = _seed_means(frame, ["defence"], "asr"), _seed_means(frame, ["defence"], "clean_accuracy")
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for d in [d for d in names if d in set(frame["defence"])]:
        (x, xe), (y, ye) = _interval(acc[acc["defence"] == d]["clean_accuracy"]), _interval(
            asr[asr["defence"] == d]["asr"])
        ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="o", capsize=3, label=names[d])
    ax.set_xlabel("clean accuracy after the defence (%)")
    ax.set_ylabel("attack success rate after the defence (%)")
    ax.set_ylim(-3, 103)
    ax.legend(fontsize=8, loc="best")
    ax.set_title("Defences on the held-out grid: removal against utility")
    fig.tight_layout()
    return fig


def grid_by_family(frame, names: dict):
    """Mean ASR per behaviour family (bars) and defence, with 95% intervals over seeds."""
    import matplotlib.pyplot as plt

    per = _seed_means(frame, ["family", "defence"], "asr")
    families = sorted(set(per["family"]))
    defences = [d for d in names if d in set(per["defence"])]
    width = 0.8 / max(len(defences), 1)
    fig, ax = plt.subplots(figsize=(min(12.0, max(6.0, 1.4 * len(families) * max(1, len(defences) / 3))), 4.2))
    for k, d in enumerate(defences):
        stats = [_interval(per[(per["family"] == f) & (per["defence"] == d)]["asr"]) for f in families]
        xs = [i + (k - (len(defences) - 1) / 2) * width for i in range(len(families))]
        err = [[e[0][0] for _, e in stats], [e[1][0] for _, e in stats]]
        ax.bar(xs, [max(m, 0.4) for m, _ in stats], width, yerr=err if any(map(any, err)) else None, capsize=2,
               label=names[d])  # one seed: no bars (a cap at the mean would read as a tiny interval)
    ax.set_xticks(range(len(families)))
    ax.set_xticklabels(families)
    ax.set_xlabel("behaviour family")
    ax.set_ylabel("attack success rate (%)")
    ax.set_ylim(0, 105)
    # below the axes: the bars reach the top in most families, so a legend inside would hide one
    ax.legend(fontsize=8, ncol=min(4, len(defences)), loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    ax.set_title("ASR per behaviour family (95% over seeds; a 0% bar is a sliver)")
    fig.tight_layout()
    return fig
