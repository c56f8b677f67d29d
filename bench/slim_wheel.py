"""A copy of a wheel without some of its files, for a device call's 64 MiB carry.

    python3 bench/slim_wheel.py SRC.whl DEST_DIR --drop pulp/solverdir/ pulp/tests/

writes DEST_DIR/<the same file name> holding every member of SRC except those whose path starts with one of
``--drop``, its ``*.dist-info/RECORD`` rewritten without their lines (pip installs the copy as it would the
original). NeMo's ``nemo.collections.llm`` imports PuLP (its auto-configurator) but never runs a solver: PuLP's
wheel is 16 MB of CBC binaries for six platforms and 0.5 MB of Python.
"""

import argparse
import sys
import zipfile
from pathlib import Path


def slim(src: Path, dest_dir: Path, drop: list[str]) -> tuple[Path, int]:
    """(the copy's path, members dropped). Raises ValueError if ``drop`` matches nothing (a typo would keep all)."""
    out = dest_dir / src.name
    tmp = out.with_suffix(".partial")
    dropped = 0
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if info.filename.startswith(tuple(drop)):
                dropped += 1
                continue
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not line.startswith(tuple(drop))).encode()
            zout.writestr(info, data)
    if not dropped:
        tmp.unlink()
        raise ValueError(f"{src}: no member starts with any of {drop}")
    tmp.replace(out)
    return out, dropped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("dest_dir", type=Path)
    parser.add_argument("--drop", nargs="+", required=True, metavar="PREFIX")
    args = parser.parse_args()
    out, dropped = slim(args.src, args.dest_dir, args.drop)
    size, was = out.stat().st_size / 2**20, args.src.stat().st_size / 2**20
    print(f"{out}: {dropped} members dropped, {size:.1f} MiB (was {was:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
