"""The fused max/argmax kernel (conceptevo.stimuli._fused) equals PyTorch's reduction.

It is a Triton kernel for GPUs; here it runs on CPU tensors in Triton's
interpreter (TRITON_INTERPRET=1, set in a subprocess before Triton is
imported). On a GPU machine tests/test_gpu.py covers the compiled kernel
inside find_stimuli.
"""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="Triton is not installed (it comes with PyTorch's CUDA builds)")

CHECK = textwrap.dedent('''
    import torch
    from conceptevo.stimuli import _fused

    torch.manual_seed(0)
    cases = 0
    for target in (2048, 3):  # 3: few programs, so each walks many tiles of its map
        _fused._TARGET_PROGRAMS = target
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for channels_last in (False, True):
                for shape in [(2, 5, 20, 20), (3, 70, 7, 7), (1, 3, 1, 9), (4, 16, 5, 1), (2, 9, 33, 31)]:
                    x = torch.randn(shape).to(dtype)
                    x[0, 0] = 1.5                                     # a constant map: its first position
                    x[-1, -1, 0, -1] = 9.0; x[-1, -1, -1, 0] = 9.0    # a tie: the first of the two
                    x[0, -1] = -float("inf")                          # nothing above -inf: position 0
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    v, p = _fused.max_argmax(x)
                    rv, rp = x.float().flatten(2).max(dim=2)
                    assert v.dtype == torch.float32 and p.dtype == torch.int64
                    assert torch.equal(v, rv), (target, dtype, channels_last, shape)
                    assert torch.equal(p, rp), (target, dtype, channels_last, shape)
                    cases += 1
    # token-shaped units [B, T, C] (channel last), viewed as maps: a reduction over the strided token axis
    for dtype in (torch.float32, torch.bfloat16):
        for shape in [(2, 50, 96), (3, 7, 5), (1, 1, 12), (4, 197, 33)]:
            t = torch.randn(shape).to(dtype)
            t[0, :, 0] = 0.25                                  # a constant token map: token 0
            t[-1, 3 % shape[1], -1] = 7.0; t[-1, -1, -1] = 7.0  # a tie: the earlier token
            m = _fused.as_maps(t)
            assert m.data_ptr() == t.data_ptr() and m.shape == (shape[0], shape[2], shape[1], 1)
            v, p = _fused.max_argmax(m)
            rv, rp = t.float().max(dim=1)
            assert torch.equal(v, rv) and torch.equal(p, rp), (dtype, shape)
            cases += 1
    x = torch.randn(2, 4, 6, 6)
    x[1, 2, 3, 3] = float("nan")
    for t in (x, x.contiguous(memory_format=torch.channels_last)):
        v, _ = _fused.max_argmax(t)
        assert torch.isnan(v[1, 2]) and int(torch.isnan(v).sum()) == 1
    assert not _fused.available(x)  # CPU tensors never take the kernel inside find_stimuli
    print("cases", cases)
''')


def test_fused_max_argmax_equals_torch():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cases 68" in r.stdout
