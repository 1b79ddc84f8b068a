"""Shared test set-up: one intra-op thread and a fixed RNG state for every test."""
from __future__ import annotations

import random

import pytest
import torch

# CI runs on 2 shared cores; one intra-op thread per test process is both faster and reproducible for tiny models
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state, whatever ran before it."""
    random.seed(0)
    torch.random.default_generator.manual_seed(0)  # CPU only; torch.manual_seed also queues CUDA seeding (slow)
