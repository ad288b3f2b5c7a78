"""A corpus of bad inputs, each run through the CLI in-process (`main(argv)`): every one must
exit 1 with a message that has no traceback, whose first line names the file and the key or
frame, and must leave no output behind. The warnings cases (data that may be legitimate) warn
once and go on; a singular cell in `clean` drops that frame with a reason.

Each case is a function of a fresh folder that builds the broken input and returns the argv, the
fragments the first line of stderr must hold, and the output path that must not be written."""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY, data_path

from lamflow.workflows.cli import main

CH4 = data_path("ch4_pbe", "valid")  # 60 frames of CH4, periodic


@dataclass
class Case:
    argv: list[str]
    first_line: list[str]  # fragments the first stderr line must contain
    out: Path | None = None  # output that must not be left behind
    env: dict[str, str] = field(default_factory=dict)
    not_in: list[str] = field(default_factory=list)  # fragments the message must not contain
    empty_dir_ok: bool = False  # `lamflow train` makes its output folder before reading the data


CASES: dict[str, Callable[[Path], Case]] = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


# ----------------------------------------------------------------------------- builders


def ch4(tmp: Path, name: str = "ch4", mutate: Callable[[Path], None] | None = None) -> Path:
    d = tmp / name
    shutil.copytree(CH4, d)
    if mutate is not None:
        mutate(d)
    return d


def npy(d: Path, key: str, fn: Callable[[np.ndarray], np.ndarray], set_: str = "set.000") -> None:
    f = d / set_ / f"{key}.npy"
    np.save(f, fn(np.load(f)))


def pipeline(tmp: Path, text: str | None = None, **edits) -> Path:
    """A small valid pipeline (pretrain + test on CH4), with `edits` deep-merged over it."""
    doc = {"name": "bad", "datasets": {"ch4": {"train": str(CH4), "valid": str(CH4)}},
           "stages": {"pretrain": {"datasets": ["ch4"], **copy.deepcopy(TINY)}, "test": {}},
           "debug": {"workdir": str(tmp / "runs")}}
    doc = merge(doc, edits)
    p = tmp / "pipe.yaml"
    p.write_text(text if text is not None else yaml.safe_dump(doc, sort_keys=False))
    return p


def merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def train_config(tmp: Path, system: Path = CH4, text: str | None = None, **edits) -> Path:
    doc = {"model": {**copy.deepcopy(TINY["model"]), "type_map": ["H", "C"]},
           "learning_rate": dict(TINY["learning_rate"]),
           "training": {**copy.deepcopy(TINY["training"]), "numb_steps": 2,
                        "training_data": {"systems": [str(system)], "batch_size": 4},
                        "validation_data": {"systems": [str(system)], "batch_size": 20}}}
    doc = merge(doc, edits)
    p = tmp / "train.yaml"
    p.write_text(text if text is not None else yaml.safe_dump(doc, sort_keys=False))
    return p


def train_case(tmp: Path, must: list[str], **kw) -> Case:
    cfg = train_config(tmp, **kw)
    return Case(["train", str(cfg), "-o", str(tmp / "out")], [str(cfg), *must], tmp / "out", empty_dir_ok=True)


def train_on(tmp: Path, system: Path, must: list[str]) -> Case:
    cfg = train_config(tmp, system)
    return Case(["train", str(cfg), "-o", str(tmp / "out")], [system.name, *must], tmp / "out", empty_dir_ok=True)


def validate(p: Path, must: list[str], *extra: str) -> Case:
    return Case(["validate", str(p), *extra], [p.name, *must])


def validate_data(tmp: Path, system: Path, must: list[str], **edits) -> Case:
    p = pipeline(tmp, datasets={"ch4": {"train": str(system), "valid": str(system)}}, **edits)
    return Case(["validate", str(p)], [p.name, system.name, *must])


def distill_pipeline(tmp: Path, **edits) -> Path:
    stages = {"finetune": {"systems": ["ch4"], "training": {"numb_steps": 2}},
              "distill": {"config": {"exploration": {"steps": 4}}}, "compress": {"config": {}}}
    return pipeline(tmp, stages=merge(stages, edits))


# ----------------------------------------------------------------------------- YAML


@case
def yaml_duplicate_key_numb_steps(tmp):
    text = pipeline(tmp).read_text().replace("      numb_steps: 4\n", "      numb_steps: 4\n      numb_steps: 0\n")
    p = pipeline(tmp, text=text)
    return validate(p, ["duplicate key 'numb_steps' at lines"])


@case
def yaml_duplicate_datasets_block(tmp):
    text = pipeline(tmp).read_text() + f"datasets:\n  other: {{train: {CH4}}}\n"
    return validate(pipeline(tmp, text=text), ["duplicate key 'datasets' at lines 2 and"])


@case
def yaml_duplicate_key_in_model_config_file(tmp):
    (tmp / "model.yaml").write_text("training:\n  numb_steps: 4\n  numb_steps: 8\n")
    p = pipeline(tmp, stages={"pretrain": {"config": str(tmp / "model.yaml")}})
    return validate(p, ["model.yaml: duplicate key 'numb_steps' at lines 2 and 3"])


@case
def yaml_duplicate_key_in_train_config(tmp):
    text = train_config(tmp).read_text().replace("  numb_steps: 2\n", "  numb_steps: 2\n  numb_steps: 3\n")
    return train_case(tmp, ["duplicate key 'numb_steps' at lines"], text=text)


@case
def yaml_duplicate_key_in_clean_config(tmp):
    (tmp / "clean.yaml").write_text("max_force: 100\nmin_distance: 0.3\nmax_force: 50\n")
    return Case(["clean", str(CH4), "-c", str(tmp / "clean.yaml"), "-o", str(tmp / "out")],
                ["clean.yaml", "duplicate key 'max_force' at lines 1 and 3"], tmp / "out")


@case
def json_duplicate_key_in_train_config(tmp):
    import json

    text = json.dumps(yaml.safe_load(train_config(tmp).read_text()))
    text = text.replace('"numb_steps": 2', '"numb_steps": 2, "numb_steps": 9')
    p = tmp / "input.json"
    p.write_text(text)
    return Case(["train", str(p), "-o", str(tmp / "out")], ["input.json", "duplicate key 'numb_steps'"], tmp / "out")


@case
def yaml_malformed(tmp):
    return validate(pipeline(tmp, text="name: x\ndatasets: {ch4: [\n"), ["malformed YAML (line"])


@case
def yaml_python_tag_refused(tmp):
    return validate(pipeline(tmp, text="name: !!python/object/apply:os.system ['echo hi']\n"), ["malformed YAML"])


@case
def yaml_top_level_list(tmp):
    return validate(pipeline(tmp, text="- a\n- b\n"), ["expected a mapping at the top level"])


# ----------------------------------------------------------------------------- pipeline spec


@case
def spec_unknown_key(tmp):
    return validate(pipeline(tmp, stages={"pretrain": {"epochs": 3}}), ["stages.pretrain.epochs: unknown key"])


@case
def spec_unknown_dataset(tmp):
    return validate(pipeline(tmp, stages={"pretrain": {"datasets": ["water"]}}),
                    ["stages.pretrain.datasets[0]: unknown dataset 'water'"])


@case
def spec_sel_entries_differ_from_type_map(tmp):
    p = pipeline(tmp, stages={"pretrain": {"model": {"descriptor": {"sel": [8, 4, 2]}}}})
    return validate(p, ["stages.pretrain.model", "descriptor.sel: 3 entries"])


@case
def spec_finetune_batch_size_0(tmp):
    p = pipeline(tmp, stages={"finetune": {"systems": ["ch4"], "training": {"training_data": {"batch_size": 0}}}})
    return validate(p, ["stages.finetune.training.training_data.batch_size", "batch_size 0"])


@case
def spec_all_loss_prefactors_0(tmp):
    zero = {k: 0 for k in ("start_pref_e", "limit_pref_e", "start_pref_f", "limit_pref_f")}
    return validate(pipeline(tmp, stages={"pretrain": {"loss": zero}}), ["stages.pretrain.loss", "every prefactor"])


@case
def spec_numb_steps_1e20(tmp):
    return validate(pipeline(tmp, stages={"pretrain": {"training": {"numb_steps": 1e20}}}),
                    ["stages.pretrain.training.numb_steps"])


@case
def spec_multitask_pretrain_checked_by_its_own_config(tmp):
    p = pipeline(tmp, datasets={"a": {"train": str(CH4), "valid": str(CH4)}},
                 stages={"pretrain": {"datasets": ["ch4", "a"], "training": {"model_prob": {"ch4": 1, "a": 1},
                                                                            "training_data": {"batch_size": 0}}},
                         "test": {"systems": ["ch4"]}})
    return validate(p, ["stages.pretrain.training.training_data.batch_size", "batch_size 0"])


@case
def spec_pool_workers_1e9(tmp):
    return validate(pipeline(tmp, debug={"pool_workers": 10**9}), ["debug.pool_workers"])


@case
def spec_fitting_layer_of_0_neurons(tmp):
    p = pipeline(tmp, stages={"pretrain": {"model": {"fitting_net": {"neuron": [8, 0]}}}})
    return validate(p, ["stages.pretrain.model.fitting_net", "neuron[1]: a layer of 0 neurons"])


@case
def spec_sel_1e12(tmp):
    p = pipeline(tmp, stages={"pretrain": {"model": {"descriptor": {"sel": [10**12, 4]}}}})
    return validate(p, ["stages.pretrain.model.descriptor", "sel[0]: 1000000000000 neighbours"])


@case
def spec_compress_stride_0(tmp):
    return validate(distill_pipeline(tmp, compress={"config": {"stride": 0}}), ["stages.compress.config.stride"], "--no-data")


@case
def spec_compress_extrapolate_below_1(tmp):
    return validate(distill_pipeline(tmp, compress={"config": {"extrapolate": 0.5}}),
                    ["stages.compress.config.extrapolate"], "--no-data")


@case
def spec_compress_unknown_key(tmp):
    return validate(distill_pipeline(tmp, compress={"config": {"strid": 0.01}}), ["stages.compress.config", "strid"],
                    "--no-data")


@case
def spec_distill_unknown_key(tmp):
    return validate(distill_pipeline(tmp, distill={"config": {"explore": {}}}), ["stages.distill.config.explore"],
                    "--no-data")


@case
def spec_clean_config_bad_value(tmp):
    return validate(pipeline(tmp, stages={"clean": {"config": {"max_force": -1}}}), ["stages.clean.config.max_force"])


@case
def spec_rcut_smth_above_rcut(tmp):
    p = pipeline(tmp, stages={"pretrain": {"model": {"descriptor": {"rcut_smth": 5.0}}}})
    return validate(p, ["stages.pretrain.model.descriptor", "rcut_smth 5.0 must be < rcut"])


@case
def spec_type_map_listed_twice(tmp):
    return validate(pipeline(tmp, type_map=["H", "C", "H"]), ["type_map: an element is listed twice"])


@case
def spec_dataset_path_missing(tmp):
    p = pipeline(tmp, datasets={"ch4": {"train": str(tmp / "nope")}})
    return validate(p, ["datasets.ch4.train", "no such file or directory"])


@case
def spec_finetune_without_valid_split(tmp):
    p = pipeline(tmp, datasets={"only": {"train": str(CH4)}}, stages={"finetune": {"systems": ["only"]}})
    return validate(p, ["stages.finetune.systems[0]", "no valid split"])


@case
def spec_finetune_pretrained_missing(tmp):
    p = pipeline(tmp, stages={"pretrain": {"enabled": False}, "finetune": {"systems": ["ch4"],
                                                                           "pretrained": str(tmp / "none.ckpt")}})
    return validate(p, ["stages.finetune.pretrained", "none.ckpt"])


@case
def spec_bad_name(tmp):
    return validate(pipeline(tmp, name="Bad_Name"), ["name: 'Bad_Name'"])


@case
def spec_gpu_selector_on_cpu_stage(tmp):
    p = pipeline(tmp, stages={"test": {"resources": {"node_selector": {"nvidia.com/gpu.present": "true"}}}})
    return validate(p, ["stages.test.resources.node_selector"])


@case
def submit_debug_refuses_before_running(tmp):
    p = pipeline(tmp, stages={"pretrain": {"training": {"training_data": {"batch_size": -4}}}})
    return Case(["submit", str(p), "--debug"], [p.name, "batch_size -4"], tmp / "runs")


@case
def retry_with_a_bad_fixed_spec(tmp):
    p = pipeline(tmp, stages={"pretrain": {"training": {"numb_steps": 1e20}}})
    return Case(["retry", "no-such-run", "--spec", str(p), "--workdir", str(tmp / "runs")],
                [p.name, "stages.pretrain.training.numb_steps"], tmp / "runs")


@case
def render_output_folder_missing(tmp):
    out = tmp / "does" / "not" / "exist" / "x.yaml"
    return Case(["render", str(pipeline(tmp, resources={"image": "reg/lamflow:1.0"})), "-o", str(out)],
                [str(out), "does not exist"], tmp / "does")


@case
def render_unpinned_image(tmp):
    p = pipeline(tmp, resources={"image": "reg/lamflow:latest"})
    return Case(["render", str(p), "-o", str(tmp / "wf.yaml")], [p.name, "resources.image", "not pinned"], tmp / "wf.yaml")


# ----------------------------------------------------------------------------- training configs


@case
def train_sel_entries_differ_from_type_map(tmp):
    return train_case(tmp, ["model: Value error, descriptor.sel: 1 entries"], model={"descriptor": {"sel": [8]}})


@case
def train_batch_size_0(tmp):
    return train_case(tmp, ["training.training_data.batch_size", "batch_size 0"],
                      training={"training_data": {"batch_size": 0}})


@case
def train_batch_size_negative(tmp):
    return train_case(tmp, ["training.validation_data.batch_size", "batch_size -4"],
                      training={"validation_data": {"batch_size": -4}})


@case
def train_batch_size_auto_abc(tmp):
    return train_case(tmp, ["training.training_data.batch_size", "'auto:abc'"],
                      training={"training_data": {"batch_size": "auto:abc"}})


@case
def train_all_loss_prefactors_0(tmp):
    zero = {k: 0.0 for k in ("start_pref_e", "limit_pref_e", "start_pref_f", "limit_pref_f", "start_pref_v", "limit_pref_v")}
    return train_case(tmp, ["loss", "every prefactor"], loss=zero)


@case
def train_negative_prefactor(tmp):
    return train_case(tmp, ["loss.start_pref_f"], loss={"start_pref_f": -1})


@case
def train_numb_steps_1e20(tmp):
    return train_case(tmp, ["training.numb_steps"], training={"numb_steps": 1e20})


@case
def train_sel_1e12_mixed_type(tmp):
    return train_case(tmp, ["model.descriptor", "sel: 1000000000000 neighbours"],
                      model={"descriptor": {"type": "se_atten", "sel": 10**12, "neuron": [4, 8], "axis_neuron": 2}})


@case
def train_sel_as_string_1e12(tmp):
    return train_case(tmp, ["model.descriptor", "'1e12'"], model={"descriptor": {"sel": "1e12"}})


@case
def train_fitting_layer_of_0_neurons(tmp):
    return train_case(tmp, ["model.fitting_net", "neuron[0]: a layer of 0 neurons"], model={"fitting_net": {"neuron": [0]}})


@case
def train_embedding_layer_too_wide(tmp):
    return train_case(tmp, ["model.descriptor", "a layer of 10000000 neurons"],
                      model={"descriptor": {"neuron": [4, 10**7]}})


@case
def train_unknown_descriptor_type(tmp):
    return train_case(tmp, ["model.descriptor", "unknown type 'se_e9'"], model={"descriptor": {"type": "se_e9"}})


@case
def train_config_missing_file(tmp):
    return Case(["train", str(tmp / "none.yaml"), "-o", str(tmp / "out")], ["none.yaml", "no such file"], tmp / "out")


@case
def train_finetune_checkpoint_missing(tmp):
    cfg = train_config(tmp)
    return Case(["train", str(cfg), "-o", str(tmp / "out"), "--finetune", str(tmp / "pre.ckpt")], ["pre.ckpt"], tmp / "out")


# ----------------------------------------------------------------------------- data (lamflow.model.data's DataErrors)


@case
def data_nan_force_in_validate(tmp):
    d = ch4(tmp, mutate=lambda d: npy(d, "force", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 30, np.nan, a)))
    return validate_data(tmp, d, ["frame 2: force contains NaN"])


@case
def data_inf_energy_in_train(tmp):
    def mut(d):
        npy(d, "energy", lambda a: np.where(np.arange(len(a)).reshape(a.shape) == 7, np.inf, a))

    return train_on(tmp, ch4(tmp, mutate=mut), ["frame 7: energy contains inf"])


@case
def data_box_missing(tmp):
    return train_on(tmp, ch4(tmp, mutate=lambda d: (d / "set.000" / "box.npy").unlink()), ["box missing"])


@case
def data_type_index_outside_type_map(tmp):
    return train_on(tmp, ch4(tmp, mutate=lambda d: (d / "type.raw").write_text("0\n0\n0\n0\n5\n")),
                    ["type.raw", "type index 5"])


@case
def data_no_sets(tmp):
    return validate_data(tmp, ch4(tmp, mutate=lambda d: shutil.rmtree(d / "set.000")), ["set"])


@case
def data_force_wrong_width(tmp):
    return train_on(tmp, ch4(tmp, mutate=lambda d: npy(d, "force", lambda a: a.reshape(len(a), -1)[:, :9])),
                    ["force has 9 values per frame, expected 15"])


@case
def data_energy_frame_count_differs(tmp):
    return train_on(tmp, ch4(tmp, mutate=lambda d: npy(d, "energy", lambda a: a[:-1])), ["energy has 59 frames"])


@case
def data_coord_missing(tmp):
    return validate_data(tmp, ch4(tmp, mutate=lambda d: (d / "set.000" / "coord.npy").unlink()), ["coord"])


@case
def data_type_map_raw_missing(tmp):
    return validate_data(tmp, ch4(tmp, mutate=lambda d: (d / "type_map.raw").unlink()), ["type_map.raw missing"])


@case
def data_element_outside_pipeline_type_map(tmp):
    return validate(pipeline(tmp, type_map=["H"]), ["element", "C"])


@case
def data_degenerate_cell_in_train(tmp):
    d = ch4(tmp, mutate=lambda d: npy(d, "box", lambda a: np.where(np.arange(len(a))[:, None] == 4, 0.0, a)))
    return train_on(tmp, d, ["frame 4: degenerate cell"])


@case
def data_sel_too_small_in_train(tmp):
    cfg = train_config(tmp, model={"descriptor": {"sel": [1, 1]}})
    return Case(["train", str(cfg), "-o", str(tmp / "out")], [str(CH4), "frame 0", "sel is [1, 1]"], tmp / "out",
                empty_dir_ok=True)


@case
def finetune_neighbours_exceed_sel_found_by_validate(tmp):
    dense = ch4(tmp, "dense", mutate=lambda d: npy(d, "box", lambda a: np.tile(np.eye(3).ravel() * 5.0, (len(a), 1))))
    p = pipeline(tmp, datasets={"dense": {"train": str(dense), "valid": str(dense)}},
                 stages={"pretrain": {"model": {"descriptor": {"sel": [4, 1]}}},
                         "finetune": {"systems": ["dense"], "training": {"numb_steps": 2}}})
    return validate(p, ["datasets.dense.train", "dense frame 0", "stages.finetune", "sel is [4, 1]", "need sel: ["])


@case
def finetune_neighbours_exceed_the_auto_sel_of_pretraining(tmp):
    dense = ch4(tmp, "dense", mutate=lambda d: npy(d, "box", lambda a: np.tile(np.eye(3).ravel() * 3.5, (len(a), 1))))
    p = pipeline(tmp, datasets={"dense": {"train": str(dense), "valid": str(dense)}},  # pretrain: sel auto on ch4
                 stages={"finetune": {"systems": ["dense"], "training": {"numb_steps": 2}}})
    return validate(p, ["datasets.dense.train", "dense frame 0", "stages.finetune", "sel is [8, 4]", "need sel: ["])


@case
def pretrain_neighbours_exceed_sel_found_by_validate(tmp):
    p = pipeline(tmp, stages={"pretrain": {"model": {"descriptor": {"sel": [2, 1]}}}})
    return validate(p, ["datasets.ch4.train", "frame 0", "stages.pretrain", "sel is [2, 1]", "need sel: [8, 4]"])


# ----------------------------------------------------------------------------- clean / test / checkpoints


@case
def clean_not_a_chemical_element(tmp):
    d = ch4(tmp, mutate=lambda d: (d / "type_map.raw").write_text("H\nQq\n"))
    return Case(["clean", str(d), "-o", str(tmp / "out"), "--no-zero-shot"], [d.name, "'Qq'", "not chemical elements"],
                tmp / "out")


@case
def clean_element_missing_from_type_map(tmp):
    return Case(["clean", str(CH4), "-o", str(tmp / "out"), "--no-zero-shot", "--type-map", "H"],
                [str(CH4), "element(s) C not in the model type map"], tmp / "out")


@case
def clean_missing_path(tmp):
    return Case(["clean", str(tmp / "nope"), "-o", str(tmp / "out")], ["nope", "no such file"], tmp / "out")


@case
def clean_config_unknown_key(tmp):
    (tmp / "clean.yaml").write_text("max_forse: 100\n")
    return Case(["clean", str(CH4), "-c", str(tmp / "clean.yaml"), "-o", str(tmp / "out")],
                ["clean.yaml", "max_forse: unknown key"], tmp / "out")


@case
def cli_test_missing_system(tmp):
    return Case(["test", "-m", str(tmp / "m.ckpt"), "-s", str(tmp / "nope"), "-o", str(tmp / "out")],
                ["nope", "no such file"], tmp / "out")


@case
def cli_test_pickle_with_code_refused(tmp):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": "lamflow-model", "x": Evil()}, tmp / "evil.ckpt")
    return Case(["test", "-m", str(tmp / "evil.ckpt"), "-s", str(CH4), "-o", str(tmp / "out")],
                ["evil.ckpt", "refused", "could run code"], tmp / "out", not_in=["weights_only=False", "weights_only"])


@case
def cli_test_text_file_as_model(tmp):
    (tmp / "model.ckpt").write_text("not a model")
    return Case(["test", "-m", str(tmp / "model.ckpt"), "-s", str(CH4), "-o", str(tmp / "out")],
                ["model.ckpt", "not a lamflow checkpoint"], tmp / "out")


@case
def inspect_missing_checkpoint(tmp):
    return Case(["inspect", str(tmp / "none.ckpt")], ["none.ckpt", "no such file"])


@case
def inspect_truncated_checkpoint(tmp):
    src = trained_checkpoint()
    (tmp / "cut.ckpt").write_bytes(src.read_bytes()[:2000])
    return Case(["inspect", str(tmp / "cut.ckpt")], ["cut.ckpt", "not a lamflow checkpoint"])


@case
def compress_missing_model(tmp):
    return Case(["compress", "-i", str(tmp / "none.ckpt"), "-o", str(tmp / "c.ckpt")], ["none.ckpt"], tmp / "c.ckpt")


# ----------------------------------------------------------------------------- data files (fixed in lamflow.model.data)

# helper data11's cases: a set.001 with another atom count, an element listed twice in
# type_map.raw, a text file saved as coord.npy, -1 in type.raw, a truncated .npy, and two atoms
# on top of each other


def _second_set_other_atoms(d: Path) -> None:
    shutil.copytree(d / "set.000", d / "set.001")
    npy(d, "coord", lambda a: a.reshape(len(a), -1)[:, :12], "set.001")
    npy(d, "force", lambda a: a.reshape(len(a), -1)[:, :12], "set.001")


@case
def data_second_set_with_other_atom_count(tmp):
    return train_on(tmp, ch4(tmp, mutate=_second_set_other_atoms), ["set.001"])


@case
def data_type_map_raw_lists_an_element_twice(tmp):
    return train_on(tmp, ch4(tmp, mutate=lambda d: (d / "type_map.raw").write_text("H\nH\n")), ["type_map.raw", "H", "twice"])


@case
def data_text_file_saved_as_coord_npy(tmp):
    c = validate_data(tmp, ch4(tmp, mutate=lambda d: (d / "set.000" / "coord.npy").write_text("1 2 3\n")), ["coord.npy"])
    c.not_in = ["pickle"]  # it is a text file, not pickled data
    return c


@case
def data_minus_one_in_type_raw(tmp):
    return train_on(tmp, ch4(tmp, mutate=lambda d: (d / "type.raw").write_text("0\n0\n0\n0\n-1\n")), ["type.raw", "index -1"])


@case
def data_truncated_npy(tmp):
    def cut(d):
        f = d / "set.000" / "force.npy"
        f.write_bytes(f.read_bytes()[:300])

    return train_on(tmp, ch4(tmp, mutate=cut), ["force.npy"])


@case
def data_two_atoms_on_top_of_each_other(tmp):
    def overlap(d):
        def f(a):
            a = a.reshape(len(a), -1, 3).copy()
            a[6, 1] = a[6, 0]
            return a.reshape(len(a), -1)

        npy(d, "coord", f)

    return train_on(tmp, ch4(tmp, mutate=overlap), ["frame 6", "on top of each other"])  # met when batches are built


# ----------------------------------------------------------------------------- the corpus

_CKPT: list[Path] = []


def trained_checkpoint() -> Path:
    """One tiny trained model for the cases that need a real checkpoint (trained once)."""
    if not _CKPT:
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="lamflow-bad-inputs-"))
        assert main(["train", str(train_config(tmp)), "-o", str(tmp / "out")]) == 0
        _CKPT.append(tmp / "out" / "model.ckpt")
    return _CKPT[0]


def written_files(p: Path | None) -> list[Path]:
    if p is None or not p.exists():
        return []
    return [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_clear_line_and_exit_1(name, tmp_path, capsys, monkeypatch):
    c = CASES[name](tmp_path)
    for k, v in c.env.items():
        monkeypatch.setenv(k, v)
    capsys.readouterr()
    rc = main(c.argv)
    err = capsys.readouterr().err
    assert rc == 1, f"{name}: exit {rc}\n{err}"
    assert "Traceback" not in err, err
    first = err.strip().splitlines()[0] if err.strip() else ""
    for frag in c.first_line:
        assert frag in first, f"{name}: {frag!r} not in the first line {first!r}"
    for frag in c.not_in:
        assert frag not in err, f"{name}: {frag!r} in {err!r}"
    assert not written_files(c.out), f"{name}: left {written_files(c.out)[:3]}"
    assert c.out is None or not c.out.exists() or c.empty_dir_ok, f"{name}: left {c.out}"


def test_corpus_has_at_least_60_cases():
    assert len(CASES) >= 60


# ----------------------------------------------------------------------------- warnings, and what is not an error


def _suspicious(d: Path) -> None:
    """Frame 9 a copy of frame 3; one force of 1e4 eV/A in frame 11; +10 eV on frame 20."""
    for key in ("coord", "box", "energy", "force", "virial"):
        npy(d, key, lambda a: np.concatenate([a[:9], a[3:4], a[10:]]))
    npy(d, "force", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 11 * a.shape[1], 1e4, a))
    npy(d, "energy", lambda a: a + 10.0 * (np.arange(len(a)).reshape(a.shape) == 20))


def test_train_warns_once_per_dataset_and_goes_on(tmp_path, capsys):
    d = ch4(tmp_path, mutate=_suspicious)
    assert main(["train", str(train_config(tmp_path, d)), "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    # one data warning (the energy-bias warning of a single-composition set is another matter)
    warnings = [ln for ln in out.splitlines() if ln.startswith("warning: training data")]
    assert len(warnings) == 1, out
    w = warnings[0]
    assert "training data" in w and "`lamflow clean`" in w
    assert f"1 exact duplicate frame(s) (first: {d} frame 9)" in w
    assert f"1 frame(s) with an atomic force above 200 eV/A (first: {d} frame 11)" in w
    assert "1 energy outlier(s)" in w and f"(first: {d} frame 20)" in w
    assert (tmp_path / "out" / "model.ckpt").is_file()


def test_test_stage_warns_once_and_refuses_nan_errors(tmp_path, capsys):
    from lamflow.model.errors import DataError
    from lamflow.model.io.checkpoint import read_checkpoint
    from lamflow.model.io.payload import save_model
    from lamflow.model.nn.potential import EnergyModel
    from lamflow.ops.common import stage_dataset
    from lamflow.ops.test import run_test

    d = ch4(tmp_path, mutate=_suspicious)
    data = tmp_path / "data"
    stage_dataset(data, "ch4", {"valid": [str(d)]})
    ckpt = trained_checkpoint()
    run_test(data, "ch4", ckpt, tmp_path / "ok")
    out = capsys.readouterr().out
    assert sum(ln.startswith("warning: test ch4 data") for ln in out.splitlines()) == 1, out
    assert (tmp_path / "ok" / "metrics.json").is_file()

    payload = read_checkpoint(ckpt)  # the same model with NaN weights
    model = EnergyModel.from_config(payload["config"])
    model.load_state_dict({k: v * float("nan") if v.is_floating_point() else v for k, v in payload["state_dict"].items()})
    save_model(model, tmp_path / "nan.ckpt")
    with pytest.raises(DataError, match=r"test ch4: .* frame 0: the model predicts a non-finite energy"):
        run_test(data, "ch4", tmp_path / "nan.ckpt", tmp_path / "bad")
    assert not written_files(tmp_path / "bad")


def test_clean_drops_a_singular_cell_frame_with_its_reason(tmp_path, capsys):
    import json

    d = ch4(tmp_path, mutate=lambda d: npy(d, "box", lambda a: np.where(np.arange(len(a))[:, None] == 4, 0.0, a)))
    assert main(["clean", str(d), "-o", str(tmp_path / "out"), "--no-zero-shot"]) == 0
    rep = json.loads((tmp_path / "out" / "clean.json").read_text())
    assert rep["counts_by_reason"]["singular_cell"] == 1
    assert [(x["frame"], x["reason"]) for x in rep["dropped_frames"]] == [(4, "singular_cell")]
    assert rep["kept"] == 59


def test_render_stays_offline_with_cluster_variables_set(tmp_path, capsys, monkeypatch):
    from dflow import config, s3_config

    monkeypatch.setenv("DFLOW_S3_REPO_KEY", "lamflow-s3")
    monkeypatch.setenv("DFLOW_K8S_API_SERVER", "https://192.0.2.1:6443")  # TEST-NET: nothing answers
    monkeypatch.setitem(s3_config, "repo_key", "lamflow-s3")  # as dflow reads it at import
    monkeypatch.setitem(config, "register_tasks", True)
    monkeypatch.setitem(config, "k8s_api_server", "https://192.0.2.1:6443")
    p = pipeline(tmp_path, resources={"image": "reg/lamflow:1.0"})
    assert main(["render", str(p), "-o", str(tmp_path / "wf.yaml")]) == 0, capsys.readouterr().err
    assert yaml.safe_load((tmp_path / "wf.yaml").read_text())["kind"] == "Workflow"
    assert s3_config["repo_key"] == "lamflow-s3" and config["register_tasks"]  # put back afterwards


def test_render_imports_dflow_offline_with_a_repo_key_in_the_environment(tmp_path):
    import os
    import subprocess
    import sys

    p = pipeline(tmp_path, resources={"image": "reg/lamflow:1.0"})
    env = {**os.environ, "DFLOW_S3_REPO_KEY": "lamflow-s3", "DFLOW_K8S_API_SERVER": "https://192.0.2.1:6443",
           "DFLOW_REGISTER_TASKS": "1", "DFLOW_LINEAGE": "no_such_module.Lineage"}
    r = subprocess.run([sys.executable, "-m", "lamflow.workflows.cli", "render", str(p), "-o", str(tmp_path / "wf.yaml")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert (tmp_path / "wf.yaml").is_file()


def test_stale_checkpoint_temporaries_are_removed_on_the_next_write(tmp_path):
    import os

    from lamflow.model.io.files import atomic_save

    stale = tmp_path / ".model.ckpt.abc123.tmp"  # what a SIGKILL between write and rename leaves
    stale.write_bytes(b"half a checkpoint")
    os.utime(stale, (1e9, 1e9))
    other = tmp_path / ".other.ckpt.x.tmp"
    other.write_bytes(b"")
    os.utime(other, (1e9, 1e9))
    atomic_save({"a": torch.zeros(1)}, tmp_path / "model.ckpt")
    assert not stale.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.ckpt.x.tmp", "model.ckpt"]
