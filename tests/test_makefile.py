"""`make setup` checks free disk space before it creates or installs anything."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def make_setup(venv: Path, *args: str, dry_run: bool = False) -> subprocess.CompletedProcess:
    command = ["make", "--no-print-directory", "-C", str(ROOT), "setup", f"VENV={venv}", *args]
    return subprocess.run(command + (["-n"] if dry_run else []), capture_output=True, text=True,
                          timeout=120)


def test_setup_stops_at_once_when_the_disk_is_short(tmp_path: Path) -> None:
    venv = tmp_path / "not" / "yet" / "venv"
    needed = shutil.disk_usage(tmp_path).free / 1e9 * 2 + 1
    result = make_setup(venv, f"SETUP_GB={needed:.0f}", "PIP_INSTALL=false")  # never installs
    assert result.returncode != 0
    assert f"GB free for {venv}, this step needs about {needed:.0f} GB" in result.stderr
    assert not (tmp_path / "not").exists()  # nothing created, nothing installed


def test_the_check_passes_when_there_is_room(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    check = make_setup(venv, "SETUP_GB=0.001", dry_run=True).stdout.splitlines()[0]
    assert "disk_usage" in check
    assert subprocess.run(["bash", "-c", check], capture_output=True, timeout=60).returncode == 0


def test_skipping_the_check_goes_on_to_create_the_environment(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    needed = shutil.disk_usage(tmp_path).free / 1e9 * 2 + 1
    result = make_setup(venv, f"SETUP_GB={needed:.0f}", "SKIP_DISK_CHECK=1",
                        "PIP_INSTALL=false")
    assert "GB free for" not in result.stderr
    assert (venv / "pyvenv.cfg").exists()  # created; `false` then stood in for the install
    assert result.returncode != 0
