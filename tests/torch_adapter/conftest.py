"""Multi-process runs on CPU (gloo), spawned once per process count for the whole session."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch.multiprocessing as mp
import torch_dist_worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(tmp_path_factory: pytest.TempPathFactory, world: int) -> Path:
    out = tmp_path_factory.mktemp(f"ranks{world}")
    mp.spawn(torch_dist_worker.run, args=(world, _free_port(), str(out)), nprocs=world,
             join=True)
    return out


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder holding what each 2-process job returned (torch_dist_worker.JOBS[2])."""
    return _spawn(tmp_path_factory, 2)


@pytest.fixture(scope="session")
def four_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder holding what each 4-process job returned (torch_dist_worker.JOBS[4])."""
    return _spawn(tmp_path_factory, 4)
