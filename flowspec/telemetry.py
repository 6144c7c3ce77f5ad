"""Per-hop timings of segments travelling around the ring.

Every segment carries one record per stage it passed: ``[name, t_recv, t_start, t_end,
t_send, bytes_in, bytes_out]`` (each node's wall clock). Compute and queueing times are
measured on one clock and are exact; wire times compare two nodes' clocks and are exact
on one machine, and as good as the nodes' clock synchronisation (NTP) on a LAN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class HopStats:
    """Sums over the segments of one request."""

    source: str  # name of the source node (first and last hop of every trip)
    # stage -> seconds computing (a pass that served several segments counts once)
    compute_s: dict[str, float] = field(default_factory=dict)
    queue_s: dict[str, float] = field(default_factory=dict)  # stage -> seconds waiting for its worker
    segments: dict[str, int] = field(default_factory=dict)  # stage -> segments computed
    rows: dict[str, int] = field(default_factory=dict)  # stage -> tree nodes computed
    wire_s: dict[str, float] = field(default_factory=dict)  # "a->b" -> seconds on the wire
    bytes: dict[str, int] = field(default_factory=dict)  # "a->b" -> payload bytes sent
    trips: int = 0  # segments that came back
    trip_s: float = 0.0  # sum of round-trip times
    _counted: dict[str, float] = field(default_factory=dict, repr=False)  # stage -> end of the compute counted

    def add(self, hops: list[list[Any]], t_sent: float, t_back: float) -> None:
        self.trips += 1
        self.trip_s += t_back - t_sent
        prev_name, prev_send = self.source, t_sent
        for h in hops:
            try:
                name, t_recv, t_start, t_end, t_send, b_in, b_out = h
                name = str(name)
                link = f"{prev_name}->{name}"
                self.wire_s[link] = self.wire_s.get(link, 0.0) + max(0.0, float(t_recv) - prev_send)
                self.bytes[link] = self.bytes.get(link, 0) + int(b_in)
                # segments come back in the order each stage computed them: a span that began
                # before the end of one already counted is (part of) the same pass
                done = self._counted.get(name, float("-inf"))
                fresh = max(0.0, float(t_end) - max(float(t_start), done))
                self.compute_s[name] = self.compute_s.get(name, 0.0) + fresh
                self._counted[name] = max(done, float(t_end))
                self.queue_s[name] = self.queue_s.get(name, 0.0) + max(0.0, float(t_start) - float(t_recv))
                self.segments[name] = self.segments.get(name, 0) + 1
                prev_name, prev_send, last_out = name, float(t_send), int(b_out)
            except (TypeError, ValueError):  # a malformed record is skipped, not fatal
                continue
        if hops and prev_name != self.source:
            link = f"{prev_name}->{self.source}"
            self.wire_s[link] = self.wire_s.get(link, 0.0) + max(0.0, t_back - prev_send)
            self.bytes[link] = self.bytes.get(link, 0) + last_out

    def summary(self, wall_s: float) -> dict[str, Any]:
        """JSON-ready: per stage compute/queue/busy fraction, per link wire time and bytes."""
        return {
            "stages": {
                n: {"compute_s": round(c, 4), "queue_s": round(self.queue_s.get(n, 0.0), 4),
                    "segments": self.segments.get(n, 0),
                    "busy": round(c / wall_s, 3) if wall_s > 0 else 0.0}
                for n, c in self.compute_s.items()
            },
            "links": {
                k: {"wire_s": round(v, 4), "bytes": self.bytes.get(k, 0),
                    "mean_ms": round(1000 * v / self.trips, 3) if self.trips else 0.0}
                for k, v in self.wire_s.items()
            },
            "trips": self.trips,
            "mean_trip_ms": round(1000 * self.trip_s / self.trips, 3) if self.trips else 0.0,
        }
