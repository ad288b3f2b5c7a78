"""lamflow.model: the PyTorch library under the pipeline (no dflow, no pipeline YAML).

Packages, lowest first; a package imports only the ones above it in this list:
  errors     one exception type per failure (LamflowError and its subclasses)
  data/      systems on disk -> frames, neighbour lists, batches, the streaming loader
  nn/        configs of a model, env matrix, networks, descriptors, fitting, the potential
  io/        checkpoints, deepmd-kit import/export, model card, LAMMPS, YAML
  training/  the trainer, loss, multi-task, denoise, DDP, statistics, fine-tuning
  tasks/     the stages built on them: clean, active learning, evaluate, distill, compress, MD, reports
"""
