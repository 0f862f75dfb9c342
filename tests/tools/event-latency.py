#!/usr/bin/env python3
# Event latency of `capvirt events`: from `capvirt suspend`/`resume` returning to the matching
# JSON line of a `capvirt events DOMAIN --loop -o json` watcher (SIGINT ends it; its exit code
# is printed). Usage: event-latency.py CAPVIRT URI DOMAIN ROUNDS (DOMAIN running; plugins from
# $CAPVIRT_PLUGIN_DIR).
import json, os, subprocess, sys, time, threading, queue, statistics
C = sys.argv[1]; uri = sys.argv[2]; dom = sys.argv[3]; n = int(sys.argv[4])
env = dict(os.environ, CAPVIRT_ENABLE="domain.events")
w = subprocess.Popen([C, "-c", uri, "events", dom, "--loop", "-o", "json"], stdout=subprocess.PIPE, env=env, text=True)
q = queue.Queue()
threading.Thread(target=lambda: [q.put((time.monotonic(), l)) for l in w.stdout], daemon=True).start()
time.sleep(1.5)
lat = []
try:
    for i in range(n):
        for cmd, kind in (("suspend", "suspended"), ("resume", "resumed")):
            subprocess.run([C, "-c", uri, cmd, dom], check=True, capture_output=True, env=env)
            done = time.monotonic()
            while True:
                t, line = q.get(timeout=10)
                if json.loads(line)["kind"] == kind:
                    lat.append((t - done) * 1000); break
finally:
    w.send_signal(2); w.wait(timeout=10)
lat.sort()
print(f"n={len(lat)} median={statistics.median(lat):.1f} ms p90={lat[int(len(lat)*0.9)-1]:.1f} ms max={lat[-1]:.1f} ms; watcher exit {w.returncode}")
