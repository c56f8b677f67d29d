"""Check an export against its manifest without serving it, both ways: every tensor the manifest lists is in the
files and every tensor in the files is in the manifest, each with its checksum (streamed group by group), and the
architecture (manifest.json's format/dtype/mla, mla_spec.json, config.json, adapter_config.json, NeMo's context/)
against the checksums recorded at export.

    python -m nemo_mla_lora.recipes.verify_export DIR      (or checkpoint=DIR)

Exit 0 and a one-line report when everything matches; exit 1 with the tensor, field and file that differ;
exit 2 for a wrong command line. (Serving and export reads check the same checksums as they read.)
"""

import sys
from pathlib import Path

USAGE = "usage: python -m nemo_mla_lora.recipes.verify_export DIR   (-h, --help: this help)"


def main(argv) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    if len(argv) != 1 or argv[0].startswith("-"):
        print(f"{USAGE}\ngot: {' '.join(argv) or 'no arguments'}", file=sys.stderr)
        return 2
    directory = argv[0].removeprefix("checkpoint=")
    if not Path(directory).is_dir():
        print(f"FAILED: {directory}: no such directory", file=sys.stderr)
        return 1
    from nemo_mla_lora.checkpoints.errors import CheckpointError
    from nemo_mla_lora.export.pipeline import verify_checksums
    from nemo_mla_lora.runtime import parallel

    parallel.init_megatron()
    try:
        report = verify_checksums(directory)
    except (CheckpointError, OSError) as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    finally:
        parallel.destroy()
    print(
        f"OK: {directory}: {report['tensors']} tensors match manifest.json both ways ({report['format']}); "
        f"architecture {report['architecture']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
