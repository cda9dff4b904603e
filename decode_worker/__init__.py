"""The decode worker: the engine's worker plus a KV receiver that lands pages from prefill workers."""
