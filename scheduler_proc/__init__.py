"""The per-instance scheduler: request lifecycle, queues, page allocator, radix cache and batch
formation. It owns metadata only; the worker owns every tensor."""
