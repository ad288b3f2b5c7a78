"""lamflow.model.training: the trainer (single- and multi-task, DDP), loss, denoise head,
statistics and fine-tuning."""
