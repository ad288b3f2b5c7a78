"""lamflow.model.io: files a model lives in: lamflow checkpoints, deepmd-kit import and export,
the model card, LAMMPS and YAML."""
