"""purifylib: find and remove backdoors in instruction-tuned LLMs without knowing the trigger.

A thin helper package behind the notebooks in ``notebooks/``: one module per pipeline stage
(``testbed`` → ``attacks`` → ``train`` → ``evaluate``; ``models`` for safe checkpoint I/O;
``reports`` and ``runner`` for outputs). Each stage takes and returns plain objects so that a
notebook cell is one call and the ``purify`` command line makes the same call.
"""

from purifylib.errors import PurifyError

__version__ = "0.1.0"

__all__ = ["PurifyError", "__version__"]
