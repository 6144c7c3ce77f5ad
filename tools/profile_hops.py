#!/usr/bin/env python3
"""Where does a ring's time go? The same command as `flowspec profile` (flowspec/profile_hops.py).

    python tools/profile_hops.py --topology topologies/local.yaml --local \\
        --json profile.json --trace trace.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a source checkout without `pip install`

from flowspec.profile_hops import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
