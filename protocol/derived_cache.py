"""What a process derives from a model file at start-up and may keep on disk: a JSON value per
(file, kind), computed once per version of the file.

Reading a GGUF file's metadata with the ``gguf`` library walks every field of its tokenizer
(~4 s for SmolLM2's 49k tokens on one core), and transformers' GGUF config and tokenizer
conversion walk them again: a SmolLM2 worker spent ~10 s and its front end ~6.5 s before serving.
What they derive (the config, the table of tensors, the tokenizer) is small, so it is kept as
JSON (never pickle) in ``$PDSERVE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/pdserve``, else
``~/.cache/pdserve``), under a key of the file's real path, size and modification time and the
cache's version. An entry that cannot be read is rebuilt; a directory that cannot be written
only costs the time (logged once per entry). Writing an entry removes the entries of the same
file and kind for its earlier versions: one entry per (file path, kind) stays.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "PDSERVE_CACHE_DIR"
VERSION = 1  # bump when what a kind stores changes


def cache_dir() -> Path:
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pdserve"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _entry_prefix(source: str, kind: str) -> str:
    """The start of the names of ``kind``'s entries for the file ``source``, whatever its version."""
    return f"{kind}-{_digest(os.path.realpath(source))}-"


def entry_path(source: str, kind: str) -> Path:
    """Where ``kind`` of the file ``source`` (as it is now) is kept."""
    st = os.stat(source)
    version = f"{VERSION}\0{st.st_size}\0{st.st_mtime_ns}"
    return cache_dir() / f"{_entry_prefix(source, kind)}{_digest(version)}.json"


def derived_json(source: str, kind: str, build: Callable[[], Any]) -> Any:
    """``build()`` for the file ``source``: from the cache when this version of the file has an
    entry of ``kind``, else computed and stored (written whole, then renamed into place)."""
    path = entry_path(source, kind)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    value = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(value))
        os.replace(partial, path)
    except (OSError, TypeError, ValueError) as e:
        logger.warning("cannot keep %s of %s in %s: %s", kind, source, path.parent, e)
        return value
    for earlier in path.parent.glob(f"{_entry_prefix(source, kind)}*.json"):
        if earlier != path:
            earlier.unlink(missing_ok=True)
    return value
