"""GrowableBuffer on CUDA: memory is unmapped only once the kernels queued before have finished.

Unmapping (cuMemUnmap) is not ordered with the streams, and the host runs ahead of the GPU (CUDA-graph decode steps
are queued without a sync), so a buffer dropped or released while its kernels still wait must wait for them.
`torch.cuda._sleep` keeps the GPU busy so that the kernels under test are still queued when the host unmaps.
"""
import gc

import pytest
import torch

from flashcore_hf.growable import GrowableBuffer

pytestmark = pytest.mark.gpu

MIB = 1 << 20
BUSY_CYCLES = 200_000_000   # ~0.1 s of GPU time: far longer than the host takes to reach the unmapping


def test_buffer_dropped_while_its_kernels_are_queued():
    buf = GrowableBuffer("cuda", 1 << 30)
    buf.grow(64 * MIB)
    x = buf.view(torch.float32, (16 * MIB,))
    x.zero_()
    torch.cuda._sleep(BUSY_CYCLES)
    x.add_(1.0)                       # queued behind the sleep
    total = x.sum()
    del x, buf                        # the last references: the memory goes back to the device here
    gc.collect()
    assert total.item() == 16 * MIB  # raises an illegal memory access if the add ran over unmapped memory


def test_release_memory_waits_for_queued_kernels_and_grows_again():
    buf = GrowableBuffer("cuda", 1 << 30)
    buf.grow(64 * MIB)
    x = buf.view(torch.float32, (16 * MIB,))
    x.fill_(1.0)
    torch.cuda._sleep(BUSY_CYCLES)
    total = x.sum()
    buf.release_memory()
    assert buf.nbytes == 0
    assert total.item() == 16 * MIB
    buf.grow(64 * MIB)
    y = buf.view(torch.float32, (16 * MIB,))
    assert y.data_ptr() == x.data_ptr()   # same addresses after the release
    y.fill_(2.0)
    assert y.sum().item() == 32 * MIB


def test_release_and_drop_inside_a_graph_capture_do_not_wait():
    """Waiting for the device is not allowed while capturing: release_memory keeps the memory, a dropped buffer is
    unmapped at the next grow outside the capture; the capture and its replay stay valid."""
    kept = GrowableBuffer("cuda", 1 << 30)
    kept.grow(4 * MIB)
    y = kept.view(torch.float32, (MIB,))
    y.zero_()
    doomed = GrowableBuffer("cuda", 1 << 30)
    doomed.grow(4 * MIB)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y.add_(1.0)
        kept.release_memory()            # ignored: the memory stays mapped
        del doomed                       # deferred
        gc.collect()
    assert kept.nbytes == 4 * MIB
    graph.replay()
    other = GrowableBuffer("cuda", 1 << 30)
    other.grow(4 * MIB)                  # unmaps the deferred buffer first
    assert y.sum().item() == MIB
