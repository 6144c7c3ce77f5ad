#!/usr/bin/env python
"""What protecting the ring's frames costs: CPU time per MB and per frame, by frame size.

For frames of the sizes the ring sends (a heartbeat; one token's activations, as
autoregressive decoding sends them; a flowspec segment of 8 rows; a prefill chunk), it
times, in CPU seconds of this process (one core):

* plain: encoding the frame and decoding it again, with no protection (the work the ring
  does anyway);
* auth: sealing and opening with ``security.encrypt: false`` (Poly1305 tag only);
* encrypt: sealing and opening with ``security.encrypt: true`` (ChaCha20-Poly1305).

Reported is the extra CPU time of each mode over plain, per frame and per MB, for sender
and receiver together. Run it on the device to know its cost; on a capped testbed node
divide by the cap.

    python tools/bench_seal.py
    python tools/bench_seal.py --repeats 2000 --json seal.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

from flowspec.runtime.protocol import Frame, FrameType, decode_frame
from flowspec.runtime.seal import LinkCipher

SIZES = {"heartbeat": 0, "1 token, 576 wide bf16": 576 * 2 + 48, "segment of 8 rows": 8 * 576 * 2 + 8 * 40,
         "prefill chunk of 256": 256 * 576 * 2 + 256 * 32}


def cpu_per_frame(payload: bytes, mode: str, repeats: int) -> float:
    frame = Frame(FrameType.SEGMENT, 3, 0, {"kind": "hidden", "n": 8}, payload)
    ns, nc = os.urandom(32), os.urandom(32)
    send = LinkCipher(b"k" * 32, ns, nc, is_client=True, encrypt=mode == "encrypt")
    recv = LinkCipher(b"k" * 32, ns, nc, is_client=False, encrypt=mode == "encrypt")
    t = time.process_time()
    for _ in range(repeats):
        data = frame.encode()
        if mode != "plain":
            wire = send.seal(data)
            data = recv.open(wire[:4], wire[4:], "peer")
        decode_frame(data)
    return (time.process_time() - t) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=1000, help="frames timed per size and mode (default 1000)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    rows = []
    print(f"{'frame':26} {'bytes':>8} {'plain us':>9} {'+auth us':>9} {'+enc us':>9} {'auth ms/MB':>11} "
          f"{'enc ms/MB':>10}")
    for name, n in SIZES.items():
        payload = os.urandom(n)
        reps = max(50, args.repeats if n < 100_000 else args.repeats // 20)
        t = {m: cpu_per_frame(payload, m, reps) for m in ("plain", "auth", "encrypt")}
        size = len(Frame(FrameType.SEGMENT, 3, 0, {"kind": "hidden", "n": 8}, payload).encode())
        auth, enc = t["auth"] - t["plain"], t["encrypt"] - t["plain"]
        per_mb = 1e6 / size * 1e3
        rows.append({"frame": name, "bytes": size, "plain_s": t["plain"], "auth_extra_s": auth,
                     "encrypt_extra_s": enc})
        print(f"{name:26} {size:8d} {t['plain'] * 1e6:9.1f} {auth * 1e6:9.1f} {enc * 1e6:9.1f} "
              f"{auth * per_mb:11.2f} {enc * per_mb:10.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
