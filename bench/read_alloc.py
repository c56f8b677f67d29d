"""Reading a file from the page cache / tmpfs into fresh tensors against one reused buffer: what first-touch page
faults cost the export's reader (each unit's tensors are new allocations; glibc maps a large one afresh and gives it
back on free, so its pages are zeroed by the kernel and faulted in again for every unit).

    python bench/read_alloc.py [--path /dev/shm/read_alloc.bin] [--gib 1] [--chunk-mib 128]

Prints GB/s per pass: ``fresh`` (a new tensor per chunk, as the reader allocates), ``fresh+trim`` (with
``malloc_trim`` after each, as the export releases memory per unit), ``reuse`` (one buffer); each twice.
"""

import argparse
import ctypes
import os
import time

import torch


def passes(fd: int, size: int, chunk: int) -> dict:
    libc = ctypes.CDLL("libc.so.6")
    buf = torch.empty(chunk, dtype=torch.uint8)

    def read_all(reuse: bool, trim: bool) -> float:
        start, offset = time.perf_counter(), 0
        while offset < size:
            t = buf if reuse else torch.empty(chunk, dtype=torch.uint8)
            offset += os.preadv(fd, [memoryview(t.numpy())], offset)
            del t
            if trim:
                libc.malloc_trim(0)
        return round(size / (time.perf_counter() - start) / 1e9, 2)

    out = {}
    for name, reuse, trim in [("fresh", False, False), ("fresh+trim", False, True), ("reuse", True, False)] * 2:
        out.setdefault(name, []).append(read_all(reuse, trim))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--path", default="/dev/shm/read_alloc.bin")
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--chunk-mib", type=int, default=128)
    args = p.parse_args()
    size = int(args.gib * (1 << 30))
    try:
        with open(args.path, "wb") as f:
            for _ in range(size // (64 << 20)):
                f.write(os.urandom(64 << 20))
        size = os.path.getsize(args.path)
        fd = os.open(args.path, os.O_RDONLY)
        try:
            print({"bytes": size, "chunk": args.chunk_mib << 20, "GBps": passes(fd, size, args.chunk_mib << 20)})
        finally:
            os.close(fd)
    finally:
        os.remove(args.path)


if __name__ == "__main__":
    main()
