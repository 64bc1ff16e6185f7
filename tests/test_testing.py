"""The measurement helpers used by benchmarks and the demo."""
import torch

from attenscribble_ops.testing import make_crf_inputs, make_similarity_inputs, peak_memory, time_it


def test_peak_memory_sees_a_temporary_allocation():
    def fn():
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, freed on return
        return float(x[0])

    for _ in range(2):  # also after a first allocation of that size was freed
        peak = peak_memory(fn)
        assert peak is not None and 60 * 2**20 <= peak <= 96 * 2**20


def test_time_it_is_positive_and_makers_are_reproducible():
    assert time_it(lambda: torch.ones(10).sum(), repeat=3) > 0
    a, b = make_crf_inputs(seed=3), make_crf_inputs(seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    s = make_similarity_inputs(heads=2, grid=(3, 5), dim=8)
    assert s["q"].shape == (2, 2, 15, 8) and s["probs"].shape == (2, 4, 12, 20)
    torch.testing.assert_close(s["probs"].sum(1), torch.ones(2, 12, 20))
