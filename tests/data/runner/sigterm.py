"""Exits 7 on SIGTERM after saying so; otherwise waits."""
import signal
import sys
import time


def bye(signum, frame):
    print("got SIGTERM", flush=True)
    sys.exit(7)


signal.signal(signal.SIGTERM, bye)
print("waiting", flush=True)
for _ in range(600):
    time.sleep(0.1)
sys.exit(1)
