"""lamflow.workflows: the pipeline layer. A pipeline YAML (spec.py) becomes a dflow DAG (dag.py)
that runs locally in dflow's debug mode or on Argo Workflows (engine.py); cli.py and cmd_*.py
are the `lamflow` command line."""
