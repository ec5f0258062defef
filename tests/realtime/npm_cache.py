"""npm packages for the tests that run stock JavaScript clients under node.

Installed once per machine into a folder per package set (under a file lock, with a
marker written last), below ``AUTODISPATCH_NPM_CACHE`` (default /tmp/autodispatch-npm-cache).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

NPM_CACHE = Path(os.environ.get("AUTODISPATCH_NPM_CACHE", "/tmp/autodispatch-npm-cache"))


def install(folder_name: str, specs: list[str]) -> Path:
    """A folder with ``node_modules`` holding ``specs`` (``name@version``), installed once."""
    folder = NPM_CACHE / folder_name
    marker = folder / "installed"
    if marker.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists():
            npm = shutil.which("npm")
            if npm is None:
                raise RuntimeError("node is installed but npm is not: install npm")
            (folder / "package.json").write_text('{"private": true}\n')
            result = subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", *specs],
                cwd=folder,
                capture_output=True,
                text=True,
                timeout=240,
                check=False,
            )
            if result.returncode != 0:
                raise RuntimeError(f"npm install failed:\n{result.stdout}\n{result.stderr}")
            marker.write_text(" ".join(specs))
    return folder
