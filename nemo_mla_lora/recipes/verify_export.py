"""Check an export against its manifest without serving it: every tensor's checksum, streamed group by group.

    python -m nemo_mla_lora.recipes.verify_export DIR

Exit 0 and a one-line report when every tensor the manifest lists is present and unchanged; otherwise exit 1
with the tensor and file that differ. (Serving and export reads check the same checksums as they read.)
"""

import sys

from nemo_mla_lora.checkpoint import CheckpointError


def main(argv) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    directory = argv[0].removeprefix("checkpoint=")
    from nemo_mla_lora import parallel
    from nemo_mla_lora.export.pipeline import verify_checksums

    parallel.init_megatron()
    try:
        report = verify_checksums(directory)
    except (CheckpointError, FileNotFoundError) as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    finally:
        parallel.destroy()
    print(f"OK: {directory}: {report['tensors']} tensors match manifest.json ({report['format']})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
