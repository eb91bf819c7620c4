"""Daemonizes the classic way (fork, setsid, fork) and lets the daemon do the work after the parent exits 0."""
import os
import sys
import time

n = int(sys.argv[1])
if os.fork():
    sys.exit(0)
os.setsid()
if os.fork():
    os._exit(0)
with open("daemon.log", "a") as log:
    for i in range(n):
        log.write(f"tick {i}\n")
        log.flush()
        time.sleep(0.1)
    log.write("daemon done\n")
