"""lamflow.model.data: systems on disk (deepmd/npy, any dpdata format) as memory-mapped frames,
neighbour lists, batches and the streaming loader; frame checks and the composition energy fit."""

from lamflow.model import lazy_exports

# public name -> the submodule that defines it; imported on first use, so that importing one light
# submodule (a config, for the CLI's validation) does not import torch and every other module
_EXPORTS = {
    "System": "systems",
    "FrameArray": "systems",
    "load_system": "systems",
    "load_systems": "systems",
    "find_systems": "systems",
    "elements_in": "systems",
    "detect_format": "formats",
    "cache_dir": "formats",
    "Batch": "batch",
    "DataSet": "batch",
    "collate": "batch",
    "make_batch": "batch",
    "pad_frames": "batch",
    "resolve_batch_size": "batch",
    "max_neighbor_counts": "batch",
    "min_neighbor_distance": "batch",
    "auto_sel": "batch",
    "NlistRequest": "neighbor",
    "NeighborOverflow": "neighbor",
    "FrameGraph": "neighbor",
    "build_graph": "neighbor",
    "find_pairs": "neighbor",
    "neighbor_counts": "neighbor",
    "batch_graph": "batch_neighbors",
    "BatchStream": "loader",
    "write_system": "write",
    "energy_bias": "composition",
    "RuleConfig": "checks",
    "apply_rules": "checks",
    "observed_elements": "coverage",
    "trained_elements": "coverage",
    "element_coverage": "coverage",
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
