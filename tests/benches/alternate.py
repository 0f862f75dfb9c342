#!/usr/bin/python3
"""Whole-process wall times of several commands, run alternately (one of each, then again), so
that every command sees the same machine load; prints min, lower quartile, median and mean.
hyperfine runs one command's runs, then the next's: on a shared machine the load changes between
them (README "Remote calls", Figures: `list` remote vs local).

    alternate.py RUNS COMMAND...   (each COMMAND one argument, split on spaces)
    e.g. alternate.py 150 'target/release/capvirt list' 'target/release/capvirt -c test+unix:///default?socket=/tmp/s list'
"""

import statistics
import subprocess
import sys
import time


def main():
    runs = int(sys.argv[1])
    commands = [c.split() for c in sys.argv[2:]]
    times = [[] for _ in commands]
    for _ in range(5):  # warm-up: page cache, the daemon's connection cache
        for command in commands:
            subprocess.run(command, stdout=subprocess.DEVNULL, check=True)
    for _ in range(runs):
        for i, command in enumerate(commands):
            started = time.perf_counter()
            subprocess.run(command, stdout=subprocess.DEVNULL, check=True)
            times[i].append((time.perf_counter() - started) * 1000)
    for text, measured in zip(sys.argv[2:], times):
        measured.sort()
        print(f"min {measured[0]:.2f}  q1 {measured[len(measured) // 4]:.2f}  "
              f"median {statistics.median(measured):.2f}  mean {statistics.mean(measured):.2f} ms  {text}")


if __name__ == "__main__":
    main()
