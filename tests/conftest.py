import os
from pathlib import Path

import pytest
import torch

# danlab reads the reference configs and the shipped weights from the folder it runs in (the repository root),
# as `make test` does; so do the tests, wherever pytest is started from.
os.chdir(Path(__file__).resolve().parents[1])


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield
