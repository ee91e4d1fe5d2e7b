"""Summarise py-spy folded stacks (``-f raw``): where the samples went.

    BENCH_PROFILE=/tmp/prof python scripts/bench/fanout.py --servers roomcast
    python scripts/bench/profile_summary.py /tmp/prof/roomcast-*.txt [--top 25]

Prints the share of samples per leaf function (self time) and per function anywhere
on the stack (inclusive time). Frames are shown without line numbers.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r":\d+\)")


def _frame(raw: str) -> str:
    name, _, where = raw.partition(" (")
    return f"{name} ({Path(_LINE.sub(')', where).rstrip(')')).name})" if where else name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for path in args.files:
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = [_frame(f) for f in stack.split(";")]
            samples += n
            own[frames[-1]] += n
            for f in set(frames):
                total[f] += n
    print(f"{samples} samples from {len(args.files)} file(s)")
    print("\nself time")
    for name, n in own.most_common(args.top):
        print(f"{100 * n / samples:6.1f}%  {name}")
    print("\ninclusive time")
    for name, n in total.most_common(args.top):
        print(f"{100 * n / samples:6.1f}%  {name}")


if __name__ == "__main__":
    main()
