"""`ftdiff train --nproc-per-node`: one process per visible GPU by default, 2 on CPU, and no
more processes than GPUs (with a faked device count)."""

from __future__ import annotations

import pytest

from service.cli.processes import CPU_PROCESSES, processes_per_node
from service.errors import UserError

pytestmark = pytest.mark.timeout(30)


def test_auto_is_one_process_per_visible_gpu_or_two_on_cpu():
    assert processes_per_node("auto", gpus=8) == 8
    assert processes_per_node("auto", gpus=1) == 1
    assert processes_per_node("auto", gpus=0) == CPU_PROCESSES == 2


def test_an_explicit_count_above_the_visible_gpus_is_refused_naming_both(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(UserError, match=r"--nproc-per-node 4 but only 2 GPU\(s\) are visible \(CUDA_VISIBLE_DEVICES=0,1\)"):
        processes_per_node("4", gpus=2)
    assert processes_per_node("2", gpus=2) == 2
    assert processes_per_node("3", gpus=0) == 3  # CPU: any count
    for bad in ("0", "-1", "many"):
        with pytest.raises(UserError):
            processes_per_node(bad, gpus=0)


def test_the_device_count_comes_from_torch(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert processes_per_node("auto") == 3
    with pytest.raises(UserError, match="only 3 GPU"):
        processes_per_node("4")
