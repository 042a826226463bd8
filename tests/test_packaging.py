"""The built wheel installs with the README's exact command, into a fresh
virtualenv whose pip is the one Python 3.11 bundles (23.2.1 here), and
brings DRF along.

pip before 23.3 does not normalize extra names, so an extra whose metadata
name differs from its spelling (``rest_framework`` is ``rest-framework`` in
the metadata) installs nothing there, with a warning only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 540


def readme_install_command() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Install", 1)[1]
    block = section.split("```sh", 1)[1].split("```", 1)[0]
    [line] = [line for line in block.splitlines() if line.startswith("pip install")]
    return line.split("#", 1)[0].strip()


def python311() -> str:
    found = shutil.which("python3.11")
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("python3.11 is not on PATH")
        pytest.skip("python3.11 is not on PATH")
    return found


def run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        args, capture_output=True, text=True, timeout=TIMEOUT, check=False, **kwargs
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(REPO)]
    )
    assert built.returncode == 0, built.stderr
    [path] = out.glob("verity_django-*.whl")
    return path


def test_wheel_metadata_names_the_extras(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        [name] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(name).decode()
    extras = set(re.findall(r"^Provides-Extra: (.+)$", metadata, re.MULTILINE))
    assert {"drf", "redis", "grip"} <= extras
    assert 'djangorestframework>=3.16; extra == "drf"' in metadata


def test_wheel_holds_only_the_library(wheel: Path) -> None:
    # The repository's other top-level packages (the demo, the tests, the
    # benchmarks, the live-server harness they share) are not the library.
    with zipfile.ZipFile(wheel) as archive:
        top_level = {name.split("/", 1)[0] for name in archive.namelist()}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"verity_django"}


def test_readme_command_installs_drf_with_the_bundled_pip(wheel: Path, tmp_path: Path) -> None:
    command = readme_install_command()
    assert command == "pip install 'verity-django[drf]'"
    venv = tmp_path / "venv"
    made = run([python311(), "-m", "venv", str(venv)])
    assert made.returncode == 0, made.stderr
    version = run([str(venv / "bin" / "pip"), "--version"])
    assert version.stdout.startswith("pip 23."), version.stdout
    env = {
        **os.environ,
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        # Where pip finds this wheel; the command itself is the README's.
        "PIP_FIND_LINKS": " ".join(
            filter(None, [str(wheel.parent), os.environ.get("PIP_FIND_LINKS")])
        ),
        "VIRTUAL_ENV": str(venv),
    }
    installed = run(["bash", "-c", command], env=env, cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr
    assert "does not provide the extra" not in installed.stdout + installed.stderr
    imported = run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.util, rest_framework, verity_django;"
            "assert importlib.util.find_spec('django_eventstream');"
            "print(verity_django.__version__)",
        ],
        env=env,
    )
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "0.1.0"
