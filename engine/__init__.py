"""GPU state: models, layers, kernels, sampling, weights, KV pool, model runner, worker loop."""
