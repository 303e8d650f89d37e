"""Where the project keeps things on disk.

Stages never rely on the working directory: every default location is derived
from the installed package's checkout, and can be overridden by an environment
variable (useful for tests and for users who keep data on another disk).
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = PROJECT_ROOT / "conf"


def results_root() -> Path:
    """Directory holding one sub-directory per experiment (``results/<name>``)."""
    return Path(os.environ.get("MICRONET_RESULTS") or PROJECT_ROOT / "results").resolve()  # set but empty: default


def release_root() -> Path:
    """The released models shipped with the repository: ``release/<name>/`` and ``release/MANIFEST.json``."""
    return Path(os.environ.get("MICRONET_RELEASE") or PROJECT_ROOT / "release").resolve()


def data_root() -> Path:
    """Directory holding shipped archives, extracted raw text and token caches."""
    return Path(os.environ.get("MICRONET_DATA") or PROJECT_ROOT / "data").resolve()


def shared_data_dir() -> Path:
    """The read-only data copies that sit beside the checkout on project machines."""
    return Path(os.environ.get("MICRONET_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
