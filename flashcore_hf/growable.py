"""`GrowableBuffer`: memory that grows in place (same base address), so page pools never copy written pages."""
from __future__ import annotations

import math

import torch

from . import _ext  # noqa: F401  (registers torch.classes.flashcore)


class GrowableBuffer:
    """A byte buffer on one device that reserves address space once and maps memory into it on demand.

    Host: mmap(PROT_NONE) + mprotect. CUDA: cuMemAddressReserve + cuMemCreate/cuMemMap (the CUDA virtual memory API),
    so mapped GPU memory is not counted by torch.cuda.memory_allocated(); `nbytes` reports it.

    device: where the memory lives. reserve_bytes: the most it can ever hold (address space only; costs no memory).
    """

    def __init__(self, device: torch.device | str, reserve_bytes: int):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self._impl = torch.classes.flashcore.GrowableBuffer(str(device), int(reserve_bytes))

    @property
    def nbytes(self) -> int:
        """Bytes mapped so far (usable by view)."""
        return int(self._impl.mapped_bytes())

    @property
    def reserved_bytes(self) -> int:
        return int(self._impl.reserved_bytes())

    def grow(self, nbytes: int) -> None:
        """Map memory until at least nbytes are usable; bytes already mapped stay where they are."""
        self._impl.grow(int(nbytes))

    def view(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor of `shape` over the first bytes of the buffer (the same base pointer every time)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = math.prod(shape) * itemsize
        return self._impl.view(nbytes).view(dtype).view(shape)
