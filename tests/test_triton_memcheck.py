"""The interpreter's memory checks (tests/triton_memcheck.py), which every Triton test in a run
without a GPU goes through: each kind of fault they exist for is caught, with the kernel, the
program and the argument named, and correct kernels pass."""
import pytest
import torch

import triton_memcheck

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

pytestmark = pytest.mark.skipif(not triton_memcheck.enabled(),
                                reason="checks the Triton interpreter (no GPU, memcheck on)")


@triton.jit
def _copy(src, dst, n, SHIFT: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if MASKED:
        inside = offsets < n
        tl.store(dst + offsets, tl.load(src + offsets + SHIFT, mask=inside, other=0.0), mask=inside)
    else:
        tl.store(dst + offsets, tl.load(src + offsets + SHIFT))


@triton.jit
def _sum_to_first(src, dst, BLOCK: tl.constexpr):
    # every program writes dst[0]: the last one wins in the interpreter, any one on a GPU
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst, tl.sum(tl.load(src + offsets)))


@triton.jit
def _read_neighbour(buf, BLOCK: tl.constexpr):
    # program p writes its block of buf and reads the block of program p - 1
    pid = tl.program_id(0)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(buf + offsets, offsets.to(tl.float32))
    if pid > 0:
        tl.store(buf + offsets, tl.load(buf + offsets - BLOCK) + 1.0)


@triton.jit
def _reread(buf, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(buf + offsets, offsets.to(tl.float32))
    # reversed: another thread of the program wrote each element
    tl.store(buf + offsets, tl.load(buf + (tl.program_id(0) * BLOCK + BLOCK - 1 - tl.arange(0, BLOCK))))


@triton.jit
def _increment(buf, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(buf + offsets, tl.load(buf + offsets) + 1.0)


def test_a_masked_kernel_inside_its_arguments_passes():
    src = torch.arange(40, dtype=torch.float32)
    dst = torch.empty(40)
    before = triton_memcheck.launches_checked
    _copy[(3,)](src, dst, 40, SHIFT=0, MASKED=True, BLOCK=16)
    assert torch.equal(dst, src)
    assert triton_memcheck.launches_checked == before + 1


def test_a_read_past_the_end_is_caught():
    src = torch.arange(40, dtype=torch.float32)
    dst = torch.empty(48)
    with pytest.raises(Exception, match=r"_copy: program \(2, 0, 0\) loads 8 element\(s\) of 4 bytes "
                                        r"outside every tensor argument.*past the end of argument 'src'"):
        _copy[(3,)](src, dst, 48, SHIFT=0, MASKED=False, BLOCK=16)


def test_a_write_past_the_end_is_caught():
    src = torch.arange(48, dtype=torch.float32)
    dst = torch.empty(40)
    with pytest.raises(Exception, match=r"stores 8 element\(s\).*argument 'dst'"):
        _copy[(3,)](src, dst, 48, SHIFT=0, MASKED=False, BLOCK=16)


def test_a_read_before_the_start_is_caught():
    src = torch.arange(32, dtype=torch.float32)
    dst = torch.empty(32)
    with pytest.raises(Exception, match=r"program \(0, 0, 0\) loads 2 element\(s\).*8 bytes before argument 'src'"):
        _copy[(2,)](src, dst, 32, SHIFT=-2, MASKED=True, BLOCK=16)


def test_a_read_outside_a_view_inside_its_storage_is_caught():
    # the view starts 16 elements into its storage: reading before it reads another tensor's data
    storage = torch.arange(64, dtype=torch.float32)
    src = storage[16:48]
    dst = torch.empty(32)
    with pytest.raises(Exception, match=r"before argument 'src'"):
        _copy[(2,)](src, dst, 32, SHIFT=-4, MASKED=True, BLOCK=16)


def test_two_programs_writing_one_address_is_a_race():
    with pytest.raises(Exception, match=r"_sum_to_first: programs \(0, 0, 0\) and \(1, 0, 0\) both write "
                                        r"address .*byte 0 of argument 'dst'"):
        _sum_to_first[(2,)](torch.ones(32), torch.zeros(1), BLOCK=16)


def test_reading_another_programs_output_is_a_race():
    with pytest.raises(Exception, match=r"_read_neighbour: program \(1, 0, 0\) reads .*argument 'buf'.*"
                                        r"program \(0, 0, 0\) writes in the same launch"):
        _read_neighbour[(2,)](torch.zeros(32), BLOCK=16)


def test_a_program_reading_what_it_stored_is_caught():
    with pytest.raises(Exception, match=r"_reread: program \(0, 0, 0\) loads a byte it stored earlier"):
        _reread[(1,)](torch.zeros(16), BLOCK=16)


def test_an_in_place_update_by_one_program_passes():
    buf = torch.arange(32, dtype=torch.float32)
    _increment[(2,)](buf, BLOCK=16)
    assert torch.equal(buf, torch.arange(32, dtype=torch.float32) + 1)
