"""The passes on a CUDA GPU agree with the CPU (skipped where there is no GPU; run on a GPU machine).

Models are float64 where results are compared exactly: then the CPU and the GPU
differ by rounding far below any gap between distinct strengths, and exact ties
(duplicated images, a blank image) are broken the same way on both.
"""
import numpy as np
import pytest
import torch

from conceptevo import find_stimuli
from conceptevo.importance import evolution_importance, reversion_counts
from conceptevo.hooks import eval_mode
from conceptevo.layers import resolve_layers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def no_tf32():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("merge", ["layer", "batch"])
def test_stimuli_on_gpu_equal_cpu(tiny_model, tiny_data, merge):
    from conftest import TensorImages

    m = tiny_model.double()
    data = TensorImages(tiny_data.images.double(), tiny_data.targets)
    cpu = find_stimuli(m, data, k=5, batch_size=16, progress=False)
    gpu = find_stimuli(m.cuda(), data, k=5, batch_size=16, device="cuda", progress=False, merge=merge)
    np.testing.assert_array_equal(gpu.indices, cpu.indices)
    np.testing.assert_array_equal(gpu.positions, cpu.positions)
    np.testing.assert_allclose(gpu.values, cpu.values, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gpu.mean, cpu.mean, rtol=1e-5)


def test_channels_last_and_bf16_on_gpu(tiny_data, no_tf32):
    from conftest import TinySeq

    torch.manual_seed(4)
    m = TinySeq().cuda()
    ref = find_stimuli(m, tiny_data, k=5, batch_size=16, device="cuda", progress=False)
    cl = find_stimuli(m, tiny_data, k=5, batch_size=16, device="cuda", progress=False, channels_last=True)
    m.to(memory_format=torch.contiguous_format)
    assert np.mean([set(a) == set(b) for a, b in zip(ref.indices, cl.indices)]) >= 0.9
    np.testing.assert_allclose(cl.values, ref.values, rtol=1e-4, atol=1e-5)
    bf = find_stimuli(m, tiny_data, k=5, batch_size=16, device="cuda", progress=False, amp=True)
    # bfloat16 keeps 8 bits of mantissa: strengths within about 1%, most top-5 images kept
    np.testing.assert_allclose(bf.values, ref.values, rtol=2e-2, atol=2e-2)
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ref.indices, bf.indices)])
    assert overlap >= 0.7, overlap


def test_importance_and_reversion_on_gpu_equal_cpu():
    from test_importance import TinyData, pair

    m_from, m_to = pair("res")
    data = TinyData()
    cpu = evolution_importance(m_from, m_to, data, 2, num_images=9, seed=1, batch_size=4, progress=False)
    layers = resolve_layers(m_to)
    rng = np.random.default_rng(0)
    masks = {n: rng.random((4, dict(m_to.named_modules())[n].out_channels)) < 0.5 for n in layers}
    pos = np.arange(0, 60, 3)
    with eval_mode(m_from, m_to):
        counts_cpu = reversion_counts(m_from, m_to, data, pos, masks, batch_size=7)
    m_from, m_to = m_from.cuda(), m_to.cuda()
    gpu = evolution_importance(m_from, m_to, data, 2, num_images=9, seed=1, batch_size=4, device="cuda", progress=False)
    np.testing.assert_array_equal(gpu.image_indices, cpu.image_indices)
    np.testing.assert_allclose(gpu.sensitivities, cpu.sensitivities, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(gpu.scores, cpu.scores)
    with eval_mode(m_from, m_to):
        counts_gpu = reversion_counts(m_from, m_to, data, pos, masks, batch_size=7, device="cuda")
    np.testing.assert_array_equal(counts_gpu[0], counts_cpu[0])
    np.testing.assert_array_equal(counts_gpu[1], counts_cpu[1])
    assert counts_gpu[2] == counts_cpu[2] == len(pos)


def test_quick_demo_on_gpu(tmp_path):
    from conceptevo.cli import main

    assert main(["demo", "--quick", "--device", "cuda", "--out", str(tmp_path / "d")]) == 0
    assert any((tmp_path / "d").rglob("*.png"))


def first_max(x: torch.Tensor):
    """Max of each map and the lowest position holding it, computed without any argmax."""
    flat = x.float().flatten(2)
    v = flat.amax(dim=2)
    where = torch.arange(flat.shape[2], device=x.device).expand_as(flat)
    return v, torch.where(flat == v.unsqueeze(2), where, flat.shape[2]).amin(dim=2)


def test_fused_kernel_on_gpu():
    pytest.importorskip("triton")
    from conceptevo.stimuli import _fused

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for channels_last in (False, True):
            for shape in [(256, 64, 56, 56), (7, 5, 20, 20), (3, 70, 7, 7), (2, 9, 33, 31), (300, 512, 14, 14), (5, 3, 1, 17)]:
                x = torch.randn(shape, device="cuda").to(dtype)  # bfloat16 maps of 3,136 values hold many ties
                x[0, 0] = 1.5
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                assert _fused.available(x)
                v, p = _fused.max_argmax(x)
                rv, rp = first_max(x)
                assert torch.equal(v, rv), (dtype, channels_last, shape)
                assert torch.equal(p, rp), (dtype, channels_last, shape)


@pytest.mark.parametrize("channels_last", [False, True])
def test_merges_agree_on_gpu(tiny_model, tiny_data, channels_last):
    """The same forward on the GPU: merging per layer and per batch (through the fused kernel) pick the same stimuli."""
    m = tiny_model.cuda()
    a = find_stimuli(m, tiny_data, k=5, batch_size=16, device="cuda", progress=False, merge="layer", channels_last=channels_last)
    b = find_stimuli(m, tiny_data, k=5, batch_size=16, device="cuda", progress=False, merge="batch", channels_last=channels_last)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.positions, b.positions)
