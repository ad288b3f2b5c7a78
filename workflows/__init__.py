"""lamflow.workflows: the pipeline layer. A pipeline YAML (spec/) becomes a dflow DAG (dag.py)
that a backend runs: locally in dflow's debug mode or on Argo Workflows (backends/).

    spec/                       the pipeline spec: schema, loading, settings, checks (spec/__init__ maps it)
    stages.py                   the stage table: name, OP, outputs, fan-out (the DAG, download, status, retry read it)
    dag.py, trainjob.py         the DAG (and a multi-node stage as a Kubeflow TrainJob)
    dflow_config.py             pointing dflow at an engine; building workflows offline, secrets blanked
    inputs.py, s3_cache.py      staging, digesting and uploading a run's inputs; the s3:// cache
    render.py                   the Argo Workflow manifest (`lamflow render`)
    backends/                   the `Backend` interface; debug.py (runner + watcher), argo.py
    runs.py                     a run: its record, its steps, its status
    retry.py, results.py        `lamflow retry`; download, logs, list
    containers.py               debug runs with every step in the step image
    cli/                        the `lamflow` command: cli/pipeline/ (run pipelines), cli/tools/ (model tools)
"""
