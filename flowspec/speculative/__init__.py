"""The speculative algorithm: pure, deterministic, no sockets."""
