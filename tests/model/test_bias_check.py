"""Per-element energy biases fitted on data whose compositions do not determine them (water alone:
N_H = 2 N_O in every frame) come with a warning; data that determine them do not."""

import numpy as np
from conftest import data_path

from lamflow.model.data.systems import System, load_systems
from lamflow.model.training.bias_check import underdetermined_bias
from lamflow.model.training.config import TrainConfig
from lamflow.model.training.trainer import train

TM = ["H", "C", "O"]


def labelled(counts: dict[str, int], nframes: int = 2) -> System:
    atype = np.concatenate([np.full(n, TM.index(e)) for e, n in counts.items()])
    return System("s", TM, atype, np.zeros((nframes, len(atype), 3)), None, energy=np.zeros(nframes))


def test_single_composition_bias_is_flagged_with_its_formula():
    note = underdetermined_bias([labelled({"O": 64, "H": 128})], TM)
    assert note.startswith("energy bias of H, O is not determined by the data: every labelled frame has the composition H2O")
    assert "fixes 1 combination of the 2 per-element biases" in note
    # water and methane: two compositions, three elements -- still one combination short
    note = underdetermined_bias([labelled({"O": 1, "H": 2}), labelled({"C": 1, "H": 4})], TM)
    assert "the 2 compositions span 2 of 3 dimensions" in note
    # a third, independent composition determines every bias; one element alone is always determined
    assert underdetermined_bias([labelled({"O": 1, "H": 2}), labelled({"C": 1, "H": 4}), labelled({"C": 2, "O": 1})], TM) is None
    assert underdetermined_bias([labelled({"C": 8})], TM) is None
    unlabelled = labelled({"O": 1, "H": 2})
    unlabelled.energy = None
    assert underdetermined_bias([unlabelled], TM) is None


def test_training_on_water_alone_warns_after_printing_the_bias(tmp_path):
    water = data_path("water_h2o_mini", "valid")
    assert {int(n) for n in np.bincount(load_systems(str(water), ["O", "H"])[0].atype)} == {64, 128}
    cfg = TrainConfig.model_validate({
        "model": {"type_map": ["O", "H"],
                  "descriptor": {"type": "se_e2_a", "rcut": 3.0, "sel": [12, 24], "neuron": [4], "axis_neuron": 2, "seed": 1},
                  "fitting_net": {"neuron": [4], "seed": 1}, "data_stat_nbatch": 1},
        "training": {"training_data": {"systems": str(water), "batch_size": 1}, "numb_steps": 1, "disp_freq": 1,
                     "save_freq": 1, "seed": 1}})
    lines = []
    train(cfg, tmp_path / "w", log=lines.append)
    k = next(i for i, line in enumerate(lines) if line.startswith("energy bias per type"))
    assert lines[k + 1].startswith("warning: energy bias of O, H is not determined by the data: "
                                   "every labelled frame has the composition H2O")
