"""One exception type per layer; each carries the file, key or frame it is about.

The CLI catches `LamflowError` only, prints its message as one line and exits 1.
"""


class LamflowError(Exception):
    """Base class: a problem the user can fix (bad input, bad config, bad file)."""


class ConfigError(LamflowError):
    """A model/training config is malformed: `train.yaml: model.descriptor.rcut: ...`."""


class DataError(LamflowError):
    """A dataset is unusable: `ch4_pbe/train frame 17: force contains NaN`."""


class CheckpointError(LamflowError):
    """A checkpoint cannot be read: `pre.ckpt: format version 3, this lamflow reads <= 1`."""


class TrainingError(LamflowError):
    """Training cannot go on: `step 120: loss is NaN (energy term)`."""
