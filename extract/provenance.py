"""What made an artifact: library versions and the git commit, recorded by every cache and run folder."""
from __future__ import annotations

import platform
import subprocess
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "zarr", "h5py", "numpy", "scikit-learn")


def provenance(repo: Path | None = None) -> dict[str, Any]:
    """Python, platform, the versions of PACKAGES, and the git commit (with whether the tree was dirty)."""
    out: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    repo = Path(repo) if repo else Path(__file__).resolve().parent.parent
    out["git_commit"], out["git_dirty"] = "unknown", None
    try:
        run = dict(cwd=repo, capture_output=True, text=True, timeout=10)
        head = subprocess.run(["git", "rev-parse", "HEAD"], **run)
        if head.returncode == 0:
            out["git_commit"] = head.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run)
            out["git_dirty"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return out
