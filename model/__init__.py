"""lamflow.model: the PyTorch library under the pipeline (no dflow, no pipeline YAML).

Packages, lowest first; a package imports only the ones above it in this list:
  errors     one exception type per failure (LamflowError and its subclasses)
  data/      systems on disk -> frames, neighbour lists, batches, the streaming loader
  nn/        configs of a model, env matrix, networks, descriptors, fitting, the potential
  io/        checkpoints, deepmd-kit import/export, model card, LAMMPS, YAML
  training/  the trainer, loss, multi-task, denoise, DDP, statistics, fine-tuning
  tasks/     the stages built on them: clean, active learning, evaluate, distill, compress, MD, reports
"""


def lazy_exports(package: str, exports: dict[str, str]):
    """(__getattr__, __all__) of a sub-package whose public names live in its modules ({name:
    module}): a name is imported on first use, so importing one light module (a config, for the
    CLI) never pulls in torch through the package."""
    from importlib import import_module

    def __getattr__(name: str):
        if name in exports:
            return getattr(import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, sorted(exports)
