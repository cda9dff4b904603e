"""pdserve tests: a regular package, so `tests.*` never resolves to another installed `tests`."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent  # the cwd of every process a test starts
