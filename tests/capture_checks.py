"""What a CUDA graph capture refuses, checked on the CPU: reading a device value back (a sync) or bringing host data
in (a host-to-device copy of a Python list). `HostDataLog` records such aten ops run inside it."""
from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class HostDataLog(TorchDispatchMode):
    """The aten ops inside the mode that read a device value back or bring host data in, in `hits`."""

    OPS = frozenset({"_local_scalar_dense", "item", "lift_fresh", "lift_fresh_copy"})

    def __init__(self):
        super().__init__()
        self.hits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.OPS:
            self.hits.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))
