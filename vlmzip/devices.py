"""Device names as users give them (``--device``, lmms-eval's ``device=``), checked against the machine.

torch is imported inside :func:`resolve_device`, so that importing this module stays cheap.
"""

from __future__ import annotations


def resolve_device(name: str) -> str:
    """``auto`` -> cuda when available, else cpu; any other name is returned as given once checked: a clear
    ValueError for a name that is no device, or a device that is not present (rather than a traceback from
    deep inside torch)."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {name}: CUDA is not available on this machine ({why}); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return name
