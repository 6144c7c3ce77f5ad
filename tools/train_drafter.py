#!/usr/bin/env python3
"""Train an EAGLE-style drafting head: the same command as `flowspec train-drafter`
(flowspec/training/train_drafter.py).

    python tools/train_drafter.py data  --out runs/eagle   # the target answers ShareGPT first turns
    python tools/train_drafter.py train --out runs/eagle   # train the head on the recorded hidden states
    python tools/train_drafter.py eval  --out runs/eagle   # acceptance length on MT-bench first turns
    python tools/train_drafter.py all   --out runs/eagle   # the three, resumable
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a source checkout without `pip install`

from flowspec.training.train_drafter import main, make_data, sharegpt_prompts, split_prompts  # noqa: E402

__all__ = ["main", "make_data", "sharegpt_prompts", "split_prompts"]

if __name__ == "__main__":
    sys.exit(main())
