"""Top functions of a raw py-spy profile (`py-spy record -f raw`, as cpu_profile.py --py-spy writes).

    spy_summary.py PROFILE.txt [--top 20]

Prints the share of samples per function: "self" (the sample's innermost frame) and "inclusive"
(anywhere on the stack). Native code of grpc and uvloop shows as the Python frame that called it.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def summarize(path: Path) -> tuple[int, Counter, Counter]:
    own: Counter = Counter()
    inclusive: Counter = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    return total, own, inclusive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    total, own, inclusive = summarize(args.profile)
    for title, counts in (("self", own), ("inclusive", inclusive)):
        print(f"-- {title} ({total} samples)")
        for frame, count in counts.most_common(args.top):
            print(f"{count * 100 / max(total, 1):5.1f}%  {frame[:140]}")


if __name__ == "__main__":
    main()
