#!/usr/bin/env python3
"""Run a topology as an emulated edge testbed on this machine.

    python tools/testbed.py up topologies/edge-5.yaml            # = flowspec up --emulate
    python tools/testbed.py up topologies/local.yaml --latency-ms 10 --bandwidth-mbit 50 --cpu-quota 0.5
    python tools/testbed.py cleanup                              # after a testbed was killed
    python tools/testbed.py link --listen 127.0.0.1:9000 --to 127.0.0.1:9001 --latency-ms 20

Each node runs as its own process, capped to a fraction of one core (cgroup v1, as root)
with one compute thread; every link node -> successor goes through a proxy adding latency,
jitter, a bandwidth limit and stalls. Settings come from the topology's `testbed` section;
the flags override them for every link / node. Ctrl-C stops everything; see
flowspec/testbed.py for how it works.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowspec.testbed import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
