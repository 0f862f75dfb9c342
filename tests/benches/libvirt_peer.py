#!/usr/bin/python3
"""The libvirtd peer of `capvirt bench call domain.info`: virDomainGetInfo through libvirtd
(python3-libvirt), N client processes, each with its own connection; prints the same figures.

    libvirt_peer.py URI CALLS [CLIENTS]
    e.g. libvirt_peer.py 'test+unix:///default?socket=/tmp/lv/libvirt-sock' 20000 8
"""

import multiprocessing as mp
import sys
import time

import libvirt


def client(uri, count, start, results):
    conn = libvirt.open(uri)
    dom = conn.lookupByName("test")
    for _ in range(100):
        dom.info()
    start.wait()
    latencies = []
    for _ in range(count):
        t = time.perf_counter_ns()
        dom.info()
        latencies.append(time.perf_counter_ns() - t)
    results.put(latencies)


def main():
    uri, calls = sys.argv[1], int(sys.argv[2])
    clients = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    start = mp.Barrier(clients + 1)
    results = mp.Queue()
    procs = [mp.Process(target=client, args=(uri, calls // clients, start, results)) for _ in range(clients)]
    for p in procs:
        p.start()
    start.wait()
    began = time.perf_counter()
    latencies = []
    for _ in procs:
        latencies.extend(results.get())
    elapsed = time.perf_counter() - began
    for p in procs:
        p.join()
    latencies.sort()

    def pct(p):
        return latencies[max(0, -(-len(latencies) * p // 100) - 1)] / 1000

    print(f"====== virDomainGetInfo on {uri} ======")
    print(f"  {len(latencies)} calls, {clients} parallel clients, completed in {elapsed:.3f} s")
    print(f"  calls/s: {len(latencies) / elapsed:.0f}")
    print(f"  latency (µs): mean {sum(latencies) / len(latencies) / 1000:.2f}  p50 {pct(50):.2f}  "
          f"p90 {pct(90):.2f}  p99 {pct(99):.2f}  max {latencies[-1] / 1000:.2f}")


if __name__ == "__main__":
    main()
