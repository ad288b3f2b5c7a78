"""Pipeline commands: submit, render, validate, status, watch, logs, list, download, retry."""
