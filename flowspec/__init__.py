"""FlowSpec: pipelined tree-based speculative decoding across a ring of edge devices."""

__version__ = "0.1.0"
