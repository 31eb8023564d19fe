"""Root pytest configuration, loaded for every collected path (tests/ and the notebooks under nbval).

Reports written while testing (nbval kernels inherit the environment) go to a scratch folder,
never over the committed reports/.
"""

import os
import tempfile

os.environ.setdefault("PURIFY_REPORTS_DIR", tempfile.mkdtemp(prefix="purify-test-reports-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
