"""Model tools, one stage by hand without a workflow: train, test, md, inspect, compress, clean,
distill, export-deepmd, import-deepmd, show, change-bias."""
