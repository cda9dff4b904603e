"""Suite-wide settings: processes started by tests use one torch thread each (2-core CI)."""

import os

os.environ.setdefault("PDSERVE_TORCH_THREADS", "1")
