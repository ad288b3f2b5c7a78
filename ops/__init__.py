"""lamflow.ops: one dflow OP per pipeline stage, each a thin shell around one lamflow.model call.

    Clean     raw datasets           -> cleaned datasets + kept/dropped report   (ops/clean.py)
    Pretrain  datasets               -> base model (one head per dataset)        (ops/pretrain.py)
    Finetune  base model + a system  -> fine-tuned model                         (ops/finetune.py)
    Test      model + a system       -> errors, parity plot, zero-shot errors    (ops/test.py)
    Distill   teacher + structures   -> small student model                      (ops/distill.py)
    Compress  student                -> tabulated (compressed) model, speed-up   (ops/compress.py)
    Report    every stage's outputs  -> report.md + PNGs + summary.json          (ops/report.py)
    PublishInputs / CollectModel: around a multi-node TrainJob                  (ops/trainjob.py)

Each module also has a plain function (`run_pretrain`, `run_test`, ...) that `execute` calls,
so a stage can be run and tested without dflow. OP classes are imported on first use (dflow
takes about a second to import).
"""

import importlib

_MODULES = {"Clean": "clean", "Pretrain": "pretrain", "Finetune": "finetune", "Test": "test",
            "Distill": "distill", "Compress": "compress", "Report": "report",
            "PublishInputs": "trainjob", "CollectModel": "trainjob"}


def __getattr__(name):
    if name in _MODULES:
        return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
