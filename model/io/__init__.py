"""lamflow.model.io: files a model lives in: lamflow checkpoints, deepmd-kit import and export,
the model card, LAMMPS and YAML."""

from lamflow.model import lazy_exports

# public name -> the submodule that defines it; imported on first use, so that importing one light
# submodule (a config, for the CLI's validation) does not import torch and every other module
_EXPORTS = {
    "atomic_save": "files",
    "atomic_write_text": "files",
    "FORMAT": "payload",
    "VERSION": "payload",
    "model_payload": "payload",
    "save_model": "payload",
    "read_checkpoint": "checkpoint",
    "build_from_payload": "checkpoint",
    "load_model": "checkpoint",
    "resolve_device": "checkpoint",
    "import_deepmd": "deepmd_import",
    "read_deepmd": "deepmd_import",
    "convert": "deepmd_import",
    "ensure_lamflow_checkpoint": "deepmd_import",
    "export_deepmd": "deepmd_export",
    "write_card": "model_card",
    "read_yaml": "yamlio",
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
