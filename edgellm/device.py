"""Which torch device an engine runs on: `--prefill-device` / `--decode-device`.

auto       CUDA when torch sees a GPU it can run on, else the CPU
cpu        the CPU
cuda[:N]   that GPU; where there is none (no CUDA build of torch, no device, a GPU too old
           for this torch build) the service fails at start with a message naming CUDA.
           Never a silent CPU fallback: a user who asked for the GPU would otherwise get a
           ten-times slower service and no error.
"""

from __future__ import annotations

import torch


class DeviceUnavailable(RuntimeError):
    """The requested device cannot be used here."""


def cuda_problem(index: int = 0) -> str | None:
    """Why CUDA device `index` cannot run this torch build, or None if it can."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) was built without CUDA"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
    count = torch.cuda.device_count()
    if index >= count:
        return f"there is no CUDA device {index} ({count} visible)"
    # A GPU older than every architecture the wheel was built for (the original Jetson Nano's
    # Maxwell sm_53 under a current torch) is "available" but cannot run a kernel.
    major, minor = torch.cuda.get_device_capability(index)
    archs = [a for a in torch.cuda.get_arch_list() if a.startswith("sm_")]
    if archs and all(int("".join(filter(str.isdigit, a))) > major * 10 + minor for a in archs):
        name = torch.cuda.get_device_name(index)
        return f"CUDA device {index} ({name}, sm_{major}{minor}) is older than this torch build supports ({archs[0]}+)"
    return None


def resolve_device(spec: str, flag: str = "--device") -> torch.device:
    """The torch device for a device spec: 'auto', 'cpu', 'cuda' or 'cuda:N'."""
    if spec == "auto":
        return torch.device("cuda:0") if cuda_problem(0) is None else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        index = int(spec.partition(":")[2] or 0)
        problem = cuda_problem(index)
        if problem is not None:
            raise DeviceUnavailable(f"{flag} {spec}: CUDA is not usable here: {problem}")
        return torch.device("cuda", index)
    raise DeviceUnavailable(f"{flag} {spec!r}: expected auto, cpu, cuda or cuda:N")


def device_label(device: torch.device) -> str:
    """What `edgellm status` shows: 'cpu' or 'cuda:0 (NVIDIA H200)'."""
    if device.type != "cuda":
        return device.type
    index = device.index or 0
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
