"""`GrowableBuffer`: memory that grows in place (same base address), so page pools never copy written pages."""
from __future__ import annotations

import math
import weakref

import torch

from . import _ext  # noqa: F401  (registers torch.classes.flashcore)


_LIVE_BUFFERS: "weakref.WeakSet[GrowableBuffer]" = weakref.WeakSet()


def total_mapped_bytes(device: torch.device | str | None = None) -> int:
    """Bytes mapped by all live GrowableBuffers (on `device`, or everywhere). On CUDA this memory is invisible to
    torch.cuda.memory_allocated(), so memory reports add it (see benchmarks/bench_e2e.py)."""
    device = None if device is None else torch.device(device)
    return sum(b.nbytes for b in list(_LIVE_BUFFERS)
               if device is None or (b.device.type == device.type and
                                     (device.index is None or b.device.index == device.index)))


class GrowableBuffer:
    """A byte buffer on one device that reserves address space once and maps memory into it on demand.

    Host: mmap(PROT_NONE) + mprotect. CUDA: cuMemAddressReserve + cuMemCreate/cuMemMap (the CUDA virtual memory API),
    so mapped GPU memory is not counted by torch.cuda.memory_allocated(); `nbytes` reports it.

    device: where the memory lives. reserve_bytes: the most it can ever hold (address space only; costs no memory).
    Memory is unmapped (release_memory, or the last view gone) only once the device has finished the kernels queued
    before, so a cache dropped while its last decode steps still run on the GPU never pulls memory from under them.
    """

    def __init__(self, device: torch.device | str, reserve_bytes: int):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self._impl = torch.classes.flashcore.GrowableBuffer(str(device), int(reserve_bytes))
        _LIVE_BUFFERS.add(self)

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

    def fit(self, nbytes: int) -> None:
        """Map at least nbytes for a new user of the buffer (a pool arena's next tenant). What is mapped already is
        kept (unmapping and mapping the same memory again costs driver calls at every generate()), unless it is more
        than twice nbytes: an earlier, larger user's memory, released first so a smaller user does not hold it."""
        if self.nbytes > 2 * nbytes:
            self.release_memory()
        self.grow(nbytes)

    def release_memory(self) -> None:
        """Unmap every byte (memory back to the device); the addresses stay reserved, and `grow` maps memory at
        the same addresses again. Tensors viewed before must not be used until then. On CUDA it first waits for the
        kernels already queued (unmapping is not stream-ordered); inside a graph capture it keeps the memory."""
        self._impl.release_memory()

    def view(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor of `shape` over the first bytes of the buffer (the same base pointer every time)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = math.prod(shape) * itemsize
        return self._impl.view(nbytes).view(dtype).view(shape)
