"""Which device a stage runs on: ``device=auto`` picks CUDA when there is one."""

from __future__ import annotations

import torch

from micronet.runs.config import ConfigError


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; any other device must exist here (else one
    :class:`ConfigError` line naming it and the devices there are), checked before a stage writes anything."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    available = ["cpu", *(f"cuda:{i}" for i in range(n_cuda)), *(["mps"] if torch.backends.mps.is_available() else [])]
    try:
        device = torch.device(name)
    except RuntimeError:  # not a device name at all (e.g. "gpu")
        device = None
    key = None if device is None else device.type if device.type in ("cpu", "mps") else \
        f"{device.type}:{device.index or 0}"
    if key not in available:
        why = " (this torch has no CUDA support)" if device is not None and device.type == "cuda" \
            and not torch.backends.cuda.is_built() else ""
        raise ConfigError(f"device {name!r} is not available{why}; available: auto, {', '.join(available)}")
    return device
