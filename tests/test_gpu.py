"""GPU workers: module and optimizer on the GPU, messages as CPU buffers; exact against CPU PyTorch.

These run where a CUDA device is visible (a GPU machine) and skip elsewhere.
"""

from __future__ import annotations

import copy

import pytest
import torch

import actorgrad as ag
from actorgrad import errors as E

cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="no CUDA device here (CPU-only machine or CPU build of torch)")


@cuda
def test_gpu_workers_train_exactly_like_cpu_pytorch(backend):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    mods = [torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)]
    refs = [copy.deepcopy(m).double() for m in mods]
    gpu = ag.spawn(copy.deepcopy(mods[0]), name="gpu", device="cuda", optimizer=ag.Optim(torch.optim.Adam, lr=0.01))
    cpu = ag.spawn(copy.deepcopy(mods[1]), name="cpu", optimizer=ag.Optim(torch.optim.Adam, lr=0.01))
    mse = ag.spawn(torch.nn.MSELoss(), name="mse", num_gpus=1)
    opts = [torch.optim.Adam(r.parameters(), lr=0.01) for r in refs]
    for _ in range(3):
        x, y = torch.randn(16, 8), torch.randn(16, 1)
        h = gpu(x)
        assert h.value().device.type == "cpu"  # messages arrive as CPU buffers
        mse(cpu(h), y).backward()
        ag.step()
        torch.nn.functional.mse_loss(refs[1](refs[0](x.double())), y.double()).backward()
        for o in opts:
            o.step()
            o.zero_grad()
    for w, r in ((gpu, refs[0]), (cpu, refs[1])):
        for k, v in r.state_dict().items():
            torch.testing.assert_close(w.state_dict()[k].double(), v, atol=1e-5, rtol=1e-4)


def test_cuda_without_a_gpu_is_a_placement_error(backend):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(E.PlacementError) as info:
        ag.spawn(torch.nn.Linear(2, 2), name="wants_gpu", device="cuda")
    assert info.value.worker == "wants_gpu"
    w = ag.spawn(torch.nn.Linear(2, 2), name="on_cpu")
    assert w(torch.ones(1, 2)).value().shape == (1, 2)
    ag.step()
