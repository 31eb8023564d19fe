"""The one restore engine for weight edits: change parameters (or slices of them) in place and put
them back bit for bit.

Every temporary edit of a model goes through :class:`WeightEdit`: neutralization at a strength
(:mod:`purifylib.neutralize`), a model carrying a synthetic variant's backdoor
(:func:`purifylib.variants.carrying`) and the sanity checks' weight reverts
(:mod:`purifylib.ablation`).
"""

from __future__ import annotations

from contextlib import contextmanager


class WeightEdit:
    """Slices of parameters held for editing. :meth:`hold` keeps a slice's original; :meth:`write`
    sets it; :meth:`restore` writes every original back."""

    def __init__(self):
        self._held = []  # (tensor, dim, index, original); dim None: the whole tensor

    def hold(self, tensor, dim: int | None = None, index=None) -> int:
        """Keep the original of ``tensor`` (or of its ``index`` slices along ``dim``); returns a handle."""
        # index_select already copies; a whole tensor is cloned
        orig = tensor.detach().clone() if dim is None else tensor.detach().index_select(dim, index)
        self._held.append((tensor, dim, index, orig))
        return len(self._held) - 1

    def original(self, handle: int):
        return self._held[handle][3]

    def write(self, handle: int, value) -> None:
        import torch

        tensor, dim, index, orig = self._held[handle]
        if tuple(value.shape) != tuple(orig.shape):
            raise ValueError(f"new value has shape {tuple(value.shape)}, expected {tuple(orig.shape)}")
        with torch.no_grad():
            if dim is None:
                tensor.copy_(value)
            else:
                tensor.index_copy_(dim, index, value.to(tensor))

    def restore(self) -> None:
        for handle in range(len(self._held)):
            self.write(handle, self._held[handle][3])

    def __len__(self) -> int:
        return len(self._held)

    @property
    def slices(self) -> int:
        """Rows or columns held (whole tensors count their first dimension)."""
        return sum(len(index) if dim is not None else t.shape[0] for t, dim, index, _ in self._held)


@contextmanager
def patched(pairs):
    """``with patched([(parameter, new value), ...]): ...``: the parameters hold the new values inside
    and their originals after, whatever happens inside."""
    edit = WeightEdit()
    try:
        for tensor, value in pairs:
            edit.write(edit.hold(tensor), value)
        yield
    finally:
        edit.restore()
