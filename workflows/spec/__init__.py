"""The pipeline spec: one YAML file -> a frozen, validated `PipelineSpec`.

    name: quickstart
    type_map: [H, C, O]                 # optional; default: every element in the datasets
    datasets:                           # name -> paths (folders, files or s3:// URIs), any dpdata format
      ch4: {train: ../examples/data/ch4_pbe/train, valid: ../examples/data/ch4_pbe/valid}
    resources: {image: registry/lamflow:0.1.0-cpu, cpu: 2, memory: 4Gi}   # defaults of every stage
    stages:
      clean:    {datasets: [ch4], config: {...}}
      pretrain: {datasets: [water], config: models/tiny.yaml, training: {numb_steps: 200}}
      finetune: {systems: [ch4], training: {numb_steps: 100}, resources: {gpus: 1, ...}}
      test:     {}                      # default: the fine-tuned systems
      distill:  {teacher: ch4, ...}
      compress: {...}
    engine: {host: https://argo:2746, namespace: lamflow, artifact_repo_key: lamflow-s3}
    debug: {workdir: lamflow-runs, pool_workers: 1}

Only `load_spec` reads raw YAML. It resolves relative paths (against the pipeline file's folder,
then the current directory) and merges `config:` model files, so everything below it receives
typed objects with absolute paths. Problems are `SpecError`s, one line each, naming the file and
the YAML path: `quick.yaml: stages.finetune.systems[2]: unknown dataset 'chon'`.
`check_spec` adds the checks that read data (paths exist, elements in the type map, NaN labels)
and builds every stage's model config, all before any step is submitted.

    base.py           SpecError, path helpers, the error formatter (the model layer's)
    schema.py         the pydantic models (PipelineSpec, its stages, Resources, Engine, Debug)
    references.py     checks across sections that read no files (run by PipelineSpec's validator)
    loading.py        load_spec: paths, `config:` files, label-free globs
    settings.py       each training stage's settings, as its OP receives them
    elements.py       the type map from the data
    label_free.py     label-free datasets (structures only: denoise heads of pretrain)
    stage_configs.py  stage configs checked with the model layer's own classes
    checks.py         check_spec, image_problems
"""

from ..stages import PARALLEL_STAGES, STAGES
from .base import Paths, SpecError, as_list, format_errors, is_s3, spec_source
from .checks import check_spec, finetune_coverage, image_problems, pinned, stage_config_problems
from .elements import native_elements, resolved_type_map, spec_elements
from .loading import find_path, load_spec, spec_from_dict, spec_from_summary, spec_summary
from .references import reference_problems, resource_problems
from .schema import (
                     CheckpointStoreSettings,
                     CleanStage,
                     CompressStage,
                     Dataset,
                     Debug,
                     DenoiseSettings,
                     DistillStage,
                     EfficiencySettings,
                     Engine,
                     FinetuneStage,
                     ModelSettings,
                     PipelineSpec,
                     PretrainStage,
                     Resources,
                     StabilitySettings,
                     Stages,
                     TestStage,
                     Toleration,
)
from .settings import finetune_settings, model_settings, zero_shot_branch

__all__ = [
    "CheckpointStoreSettings", "CleanStage", "CompressStage", "Dataset", "Debug", "DenoiseSettings", "DistillStage",
    "EfficiencySettings", "Engine", "FinetuneStage", "ModelSettings", "PARALLEL_STAGES", "Paths", "PipelineSpec",
    "PretrainStage", "Resources", "STAGES", "SpecError", "StabilitySettings", "Stages", "TestStage", "Toleration", "as_list",
    "check_spec", "find_path", "finetune_coverage", "finetune_settings", "format_errors", "image_problems", "is_s3",
    "load_spec", "model_settings", "native_elements", "pinned", "reference_problems", "resolved_type_map",
    "resource_problems", "spec_elements", "spec_from_dict", "spec_from_summary", "spec_source", "spec_summary",
    "stage_config_problems", "zero_shot_branch",
]
