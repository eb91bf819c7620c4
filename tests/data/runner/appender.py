"""A tool that appends to a log and rewrites a result file as it runs, and checks on every step that the files
agree with its memory: a resume against files that hold the future (or the past) exits 5."""
import os
import sys
import time

n, delay = int(sys.argv[1]), float(sys.argv[2])
log = open("log.txt", "a")
for i in range(n):
    if os.path.exists("result.txt"):
        with open("result.txt") as fh:
            seen = fh.read()
        if seen != str(i - 1):
            print(f"inconsistent: result.txt says {seen!r} at step {i}", flush=True)
            sys.exit(5)
    elif i:
        print(f"inconsistent: result.txt missing at step {i}", flush=True)
        sys.exit(5)
    log.write(f"step {i}\n")
    log.flush()
    with open("result.txt", "w") as fh:
        fh.write(str(i))
    print(f"step {i}", flush=True)
    time.sleep(delay)
print("finished", flush=True)
sys.exit(int(sys.argv[3]) if len(sys.argv) > 3 else 0)
