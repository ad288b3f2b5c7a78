"""lamflow.model.tasks: the stages built on a trained model: clean, active learning, evaluate,
distill, compress, MD, LAMBench metrics, reports."""

from lamflow.model import lazy_exports

# public name -> the submodule that defines it; imported on first use, so that importing one light
# submodule (a config, for the CLI's validation) does not import torch and every other module
_EXPORTS = {
    "CleanConfig": "clean",
    "active_learning": "active",
    "ActiveConfig": "active",
    "evaluate_systems": "evaluate",
    "transferability": "evaluate",
    "parity_plot": "evaluate",
    "DistillConfig": "distill",
    "compress_model": "compress",
    "run_md": "md",
    "LamflowCalculator": "calculator",
    "gather_report": "report",
    "write_markdown": "report",
    "fit_baseline": "baseline",
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
