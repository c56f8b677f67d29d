"""A plain (non-editable) install ships conf/ inside the package and finds it from any directory."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "nemo_mla_lora").rglob("__init__.py")}
    assert on_disk - {"nemo_mla_lora.conf"} <= listed, sorted(on_disk - listed)
    assert "nemo_mla_lora.conf" in listed


@pytest.mark.slow
def test_non_editable_install_composes_configs_elsewhere(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert (target / "nemo_mla_lora" / "conf" / "finetune.yaml").is_file()
    assert (target / "nemo_mla_lora" / "conf" / "model" / "deepseek_v3.yaml").is_file()
    assert (target / "nemo_mla_lora" / "data" / "upper_train.jsonl").is_file()
    assert not (target / "studies").exists() and not (target / "nemo_mla_lora" / "conf" / "study").exists()
    assert (target / "nemo_mla_lora" / "models" / "configs" / "deepseek_v3.json").is_file()
    code = (
        "import nemo_mla_lora.config.compose as c, nemo_mla_lora.data as d;"
        "cfg = c.compose('finetune', ['model=deepseek_v3', 'trainer=megatron', 'data.tokenizer=byte']);"
        "print(c.__file__, cfg.trainer.tensor_parallel, d.DATA_DIR)"
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert str(target) in proc.stdout and " 8 " in proc.stdout


def test_one_version_source():
    """pyproject.toml takes the version from ``nemo_mla_lora.__version__`` (dynamic), so the installed metadata says
    the same."""
    from importlib.metadata import version

    import nemo_mla_lora

    assert "version" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dynamic"]
    assert version("nemo_mla_lora") == nemo_mla_lora.__version__
