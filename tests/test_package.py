"""Package-level behaviour: a helpful ImportError without the extension; the growable buffer used by page pools."""
import subprocess
import sys

import torch

from flashcore_hf.growable import GrowableBuffer


def test_import_without_extension_says_how_to_build():
    code = ("import sys; sys.modules['flashcore_hf._C'] = None\n"
            "try:\n    import flashcore_hf\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "flashcore_hf._C is not built" in out and "pip install --no-build-isolation -e ." in out


def test_growable_buffer_grows_in_place():
    buf = GrowableBuffer("cpu", reserve_bytes=1 << 30)
    buf.grow(4096)
    first = buf.view(torch.float32, (1024,))
    first.copy_(torch.arange(1024, dtype=torch.float32))
    buf.grow(10 << 20)
    assert buf.nbytes >= 10 << 20
    second = buf.view(torch.float32, ((10 << 20) // 4,))
    assert second.data_ptr() == first.data_ptr()
    assert torch.equal(second[:1024], torch.arange(1024, dtype=torch.float32))
    second[-1] = 7.0                                           # the new memory is usable
    del buf, second
    assert first[5] == 5.0                                      # views keep the buffer alive


def test_growable_buffer_rejects_growth_past_reservation():
    buf = GrowableBuffer("cpu", reserve_bytes=1 << 20)
    try:
        buf.grow(2 << 20)
    except RuntimeError as err:
        assert "only" in str(err) and "reserved" in str(err)
    else:
        raise AssertionError("growth past the reservation must fail")
    try:
        buf.view(torch.uint8, (1 << 20,))
    except RuntimeError as err:
        assert "call grow first" in str(err)
    else:
        raise AssertionError("a view past the mapped bytes must fail")


def test_growable_buffer_release_keeps_addresses():
    buf = GrowableBuffer("cpu", reserve_bytes=1 << 24)
    buf.grow(1 << 20)
    ptr = buf.view(torch.uint8, (1 << 20,)).data_ptr()
    buf.release_memory()
    assert buf.nbytes == 0
    buf.grow(1 << 21)
    again = buf.view(torch.uint8, (1 << 21,))
    assert again.data_ptr() == ptr and again.sum() == 0            # same address, fresh (zeroed) memory
