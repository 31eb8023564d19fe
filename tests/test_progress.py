"""Progress bars: text when streamed, hidden (not destroyed) widgets, early stops shown as done."""

import io

from purifylib.progress import _hidden_on_close, bar, stop_early


def test_text_bars_when_asked(monkeypatch):
    from tqdm.std import tqdm

    monkeypatch.setenv("PURIFY_PROGRESS", "text")
    out = io.StringIO()
    b = bar(range(2), desc="work", file=out)
    assert type(b) is tqdm
    list(b)
    assert "work" in out.getvalue() and "2/2" in out.getvalue()


def test_an_early_stop_ends_as_done_at_the_count_reached():
    from tqdm.std import tqdm

    out = io.StringIO()
    b = tqdm(range(11), desc="choose tau", file=out, mininterval=0)
    for i in b:
        if i == 4:
            stop_early(b, i + 1)
            break
    last = out.getvalue().split("\r")[-1]
    assert "5/5" in last and "100%" in last  # the last thing drawn: done at the count reached
    stop_early(tqdm(range(2), disable=True), 1)  # a disabled bar is left alone


def test_a_finished_transient_widget_bar_is_hidden_not_closed():
    from tqdm.notebook import tqdm_notebook

    b = _hidden_on_close(tqdm_notebook)(range(3), leave=False)
    list(b)
    assert b.container.layout.display == "none"
    assert b.container.comm is not None  # its widget model lives on: a reloaded page still finds it


def test_an_early_stop_of_a_widget_bar_stays_done_after_the_loop_breaks():
    import gc

    from tqdm.notebook import tqdm_notebook

    b = _hidden_on_close(tqdm_notebook)([0.05, 0.2, 0.4], desc="choose tau")
    for _ in b:
        stop_early(b, 1)
        break
    gc.collect()  # the abandoned iterator's exit ran
    label, bar = b.container.children[2], b.container.children[1]
    assert "1/1" in label.value and bar.bar_style == "success"
