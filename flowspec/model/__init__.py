"""The numerical engine: weights, stages, KV cache. No sockets, no runtime imports."""
