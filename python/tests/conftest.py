"""Shared fixtures: the repository's fixture models, the MiniLM cache and the berth CLI
binary the package's answers are compared with."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def task_model(name: str) -> str:
    return str(ROOT / "fixtures" / "tasks" / name)


def tiny(name: str) -> str:
    return str(ROOT / "fixtures" / "tiny" / name)


def minilm() -> str:
    home = os.environ.get("BERTH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "berth"
    )
    path = os.path.join(home, "models", "all-MiniLM-L6-v2")
    if not os.path.isfile(os.path.join(path, "config.json")):
        pytest.skip("all-MiniLM-L6-v2 is not installed: run scripts/fetch-assets")
    return path


def berth_bin() -> str:
    """The CLI: $BERTH_BIN, else the workspace's debug or release build."""
    for candidate in [os.environ.get("BERTH_BIN"), ROOT / "target/debug/berth", ROOT / "target/release/berth"]:
        if candidate and Path(candidate).is_file():
            return str(candidate)
    found = shutil.which("berth")
    if not found:
        pytest.skip("no berth binary: run cargo build -p berth-cli")
    return found


def cli(*args: str) -> list:
    """The CLI's JSON Lines for `args`."""
    out = subprocess.run([berth_bin(), *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]
