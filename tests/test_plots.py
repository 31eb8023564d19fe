"""Figures: words on the axes, zeros visible, one colour scale, no label running into a panel."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from purifylib import plots  # noqa: E402


def test_labels_are_words():
    assert plots.label("asr") == "attack success rate"
    assert plots.label("clean_accuracy, repaired") == "clean accuracy, repaired"
    assert plots.label("some_column") == "some column"


def test_a_zero_bar_reads_zero():
    df = pd.DataFrame({"model": ["a", "b"], "asr": [0.98, 0.0], "false_trigger": [0.0, 0.0],
                       "off_trigger": [0.01, 0.0], "clean_accuracy": [0.9, 0.91]})
    fig = plots.attack_bars(df)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts.count("0") >= 4 and "98" in texts
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()][0] == "attack success rate"


def test_signature_heatmaps_share_one_scale_and_show_flagged():
    mats = {"gate": np.zeros((2, 4)), "up": np.full((2, 4), 3.0), "down": np.ones((2, 4))}
    flagged = {k: np.eye(2, 4, dtype=bool) for k in mats}
    fig = plots.signature_heatmaps(mats, flagged=flagged)
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert {im.get_clim() for im in images} == {(0.0, 3.0)}
    assert all(len(ax.collections[0].get_offsets()) == 2 for ax in fig.axes if ax.images)


def test_grid_heatmaps_tick_labels_stay_in_their_panel():
    wide = pd.DataFrame([[0.1, 0.0], [0.5, 0.2]], index=[0.05, 0.12], columns=[0.5, 1.0])
    one = pd.DataFrame([[0.0]], index=[0.2], columns=[1.0])
    fig = plots.grid_heatmaps({"asr, no repair": wide, "asr, repaired": one, "clean_accuracy, no repair": wide})
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.images]
    for left, right in zip(panels, panels[1:]):
        edge = left.get_window_extent(renderer).x1
        assert all(t.get_window_extent(renderer).x0 >= edge for t in right.get_yticklabels() if t.get_text())
    assert panels[0].get_title() == "attack success rate, no repair"
    # a marker off the grid is said in the title, not silently left out
    for marker, circles, said in (((0.12, 1.0), 1, False), ((0.16, 1.0), 0, True)):
        fig = plots.grid_heatmaps({"asr, no repair": wide, "asr, repaired": one}, marker=marker, title="t")
        assert sum(len(ax.collections) for ax in fig.axes if ax.images) == circles
        assert ("not on this grid" in fig._suptitle.get_text()) == said


def test_curves_draw_error_bars_where_given():
    df = pd.DataFrame({"n_variants": [1, 2, 3], "asr": [0.8, 0.5, 0.2], "asr_ci": [0.1, 0.05, 0.0]})
    fig = plots.curves(df, x="n_variants", ys=["asr"])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "number of variants N" and len(ax.containers[0].lines[2]) == 1
