"""The prefill worker: the engine's worker plus a KV sender that moves finished pages to decode workers."""
