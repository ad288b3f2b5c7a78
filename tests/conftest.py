import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LAMFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
EXAMPLE_DATA = REPO / "examples" / "data"

# Every test trains or evaluates tiny models: one thread is faster for them and unaffected by other
# work on a busy CPU (two threads were 3-15x slower here when the second core was busy).
torch.set_num_threads(1)


# A tiny stage config shared by the op and pipeline tests (seconds per stage on one CPU thread).
TINY = {
    "model": {"descriptor": {"type": "se_e2_a", "rcut": 4.0, "rcut_smth": 0.5, "sel": "auto", "neuron": [4, 8],
                             "axis_neuron": 2, "seed": 1},
              "fitting_net": {"neuron": [8, 8], "seed": 1}},
    "learning_rate": {"start_lr": 0.005, "stop_lr": 1e-4, "decay_steps": 5},
    "training": {"numb_steps": 4, "disp_freq": 2, "save_freq": 2, "seed": 1, "training_data": {"batch_size": 4},
                 "validation_data": {"batch_size": 20}},
}


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
