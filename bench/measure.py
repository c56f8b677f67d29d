"""Run a command: its wall seconds and the peak resident memory of the largest process it ran (no torch here, so
the figure is the command's, not this wrapper's).

    python3 bench/measure.py [--out M.json] [--log CMD.log] [--sync] -- COMMAND ...
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out")
    p.add_argument("--log")
    p.add_argument("--sync", action="store_true", help="include a sync of the file systems after the command")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    start = time.perf_counter()
    with open(args.log or "/dev/null", "w") as log:
        rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    if args.sync:
        subprocess.run(["sync"], check=False)
    info = {"command": command[:6], "rc": rc, "seconds": round(time.perf_counter() - start, 2),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 3)}
    print(json.dumps(info))
    if args.out:
        Path(args.out).write_text(json.dumps(info, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
