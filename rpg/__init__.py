"""RPG: Recurrent diffusion for large-scale Parameter Generation."""

import os as _os
import sys as _sys

# Progress bars written to log files (Snakemake rules, batch jobs) update every 10 s instead of every step.
# tqdm reads TQDM_* variables when it is first imported, so this must run before any rpg module imports it.
if not (_sys.stderr is not None and _sys.stderr.isatty()):
    _os.environ.setdefault("TQDM_MININTERVAL", "10")

__version__ = "0.1.0"
