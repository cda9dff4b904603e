"""pdserve tests: a regular package, so `tests.*` never resolves to another installed `tests`."""
