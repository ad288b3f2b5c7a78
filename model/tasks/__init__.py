"""lamflow.model.tasks: the stages built on a trained model: clean, active learning, evaluate,
distill, compress, MD, LAMBench metrics, reports."""
