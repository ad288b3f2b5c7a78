import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LAMFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
EXAMPLE_DATA = REPO / "examples" / "data"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def data_path(*parts) -> Path:
    """Test data: ../shared/data when present, else the copy bundled in examples/data."""
    for root in (SHARED_DATA, EXAMPLE_DATA):
        p = root.joinpath(*parts)
        if p.exists():
            return p
    raise FileNotFoundError(f"test data {'/'.join(parts)} not found in {SHARED_DATA} or {EXAMPLE_DATA}")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA
