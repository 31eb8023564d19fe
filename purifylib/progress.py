"""Progress bars for every long loop: :func:`bar` is ``tqdm`` with two fixes.

- ``PURIFY_PROGRESS=text`` (``purify reproduce`` sets it for its kernels) draws text bars on
  stderr, which the runner streams to the terminal, so a long notebook cell shows what it is doing;
  otherwise ``tqdm.auto`` decides (widgets in JupyterLab, text in a terminal).
- A finished widget bar made with ``leave=False`` is hidden, not closed: closing destroys its
  widget model, and the saved output then reads "Error displaying widget: model not found" after a
  page reload.

:func:`stop_early` closes a bar whose loop ended before its total (a search that found its answer)
as a success at the count reached, instead of leaving it at 0/N or marking it failed.
"""

from __future__ import annotations

import os

ENV = "PURIFY_PROGRESS"


_HIDDEN = {}


def _hidden_on_close(base):
    """``base`` (a notebook tqdm class) whose ``leave=False`` bars hide when done instead of closing."""
    if base not in _HIDDEN:
        class HiddenOnClose(base):
            def display(self, *args, close=False, **kwargs):
                if close:  # hide, keep the widget model alive (see the module docstring)
                    if self.container.children[1].bar_style != "danger":
                        self.container.layout.display = "none"
                    return None
                return super().display(*args, **kwargs)

        _HIDDEN[base] = HiddenOnClose
    return _HIDDEN[base]


def bar(iterable=None, **kwargs):
    """A progress bar (``tqdm``'s arguments); text when ``PURIFY_PROGRESS=text``."""
    if os.environ.get(ENV) == "text":
        import sys

        from tqdm.std import tqdm

        kwargs.setdefault("file", sys.stderr)
        kwargs.setdefault("mininterval", 2.0)  # a streamed log, not a live terminal line
        return tqdm(iterable, **kwargs)
    from tqdm.auto import tqdm
    from tqdm.notebook import tqdm_notebook

    if issubclass(tqdm, tqdm_notebook) and not kwargs.get("disable"):
        return _hidden_on_close(tqdm)(iterable, **kwargs)
    return tqdm(iterable, **kwargs)


def stop_early(progress, count: int) -> None:
    """Close ``progress`` as finished after ``count`` steps (its loop stopped before the total; a
    ``for`` loop over a bar counts a step only when the next one starts, so the caller says how many)."""
    if getattr(progress, "disable", True):
        return
    progress.n = progress.total = count
    progress.refresh()
    progress.close()
    # a notebook bar's iterator, left by ``break``, redraws the bar as failed at the count it held (0):
    # a bar closed here draws nothing more
    progress.disp = lambda *args, **kwargs: None
