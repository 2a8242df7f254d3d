#!/usr/bin/env python3
"""What a broker sees when N gateways lost it at the same moment and it comes back
after an outage: a simulation of the upstream link's reconnect backoff (`backoff` in
agent/src/sync/mod.rs: the delay after failed attempt k, counted from 0, is
min(reconnect_min * 2^k, reconnect_max), times a uniform factor in [0.5, 1]; a
refused connection fails at once). Prints, per reconnect_max, how long until every
gateway is back, the median, the most connects in any one second, and the attempts
per second in the last 10 s of the outage. docs/fleet.md has the table.

    scripts/reconnect_storm.py [--gateways 10000] [--min 0.1] [--max 1,5,10,30,60]
                               [--outage 60,600] [--seed 1]
"""
import argparse
import random


def storm(n, outage, rmin, rmax, rng):
    back, late_attempts = [], 0
    for _ in range(n):
        t, k = 0.0, 0
        while True:
            t += min(rmin * (1 << min(k, 16)), rmax) * rng.uniform(0.5, 1.0)
            k += 1
            if t >= outage:
                back.append(t - outage)
                break
            if t >= outage - 10:
                late_attempts += 1
    back.sort()
    peak, j = 0, 0
    for i, x in enumerate(back):
        while back[j] < x - 1.0:
            j += 1
        peak = max(peak, i - j + 1)
    return back[-1], back[len(back) // 2], peak, late_attempts / 10


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gateways", type=int, default=10_000)
    p.add_argument("--min", type=float, default=0.1, help="reconnect_min, seconds")
    p.add_argument("--max", default="1,5,10,30,60", help="reconnect_max values, seconds")
    p.add_argument("--outage", default="60,600", help="outage lengths, seconds")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    rng = random.Random(a.seed)
    print("reconnect_max  outage  all back after  median  peak connects in 1 s  attempts/s late in the outage")
    for rmax in (float(x) for x in a.max.split(",")):
        for outage in (float(x) for x in a.outage.split(",")):
            last, median, peak, late = storm(a.gateways, outage, a.min, rmax, rng)
            print(f"{rmax:12.0f}s {outage:6.0f}s {last:14.2f}s {median:6.2f}s {peak:21d} {late:30.0f}")


if __name__ == "__main__":
    main()
