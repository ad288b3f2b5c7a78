"""lamflow.model.nn: the network: model configs, the smooth environment matrix, MLPs,
descriptors (se_e2_a, se_atten, dpa2, dpa3; a registry the classes fill), the energy fitting
net, the potential (energy -> forces, virial) and its Potential protocol."""

from lamflow.model import lazy_exports

# public name -> the submodule that defines it; imported on first use, so that importing one light
# submodule (a config, for the CLI's validation) does not import torch and every other module
_EXPORTS = {
    "ModelConfig": "config",
    "FittingConfig": "config",
    "DESCRIPTOR_TAGS": "config",
    "DESCRIPTOR_CONFIGS": "config",
    "SeE2AConfig": "descriptor_config",
    "SeAttenConfig": "descriptor_config",
    "DPA2Config": "descriptor_config",
    "DPA3Config": "descriptor_config",
    "dtype_name": "descriptor_config",
    "Descriptor": "descriptor",
    "REGISTRY": "descriptor",
    "build_descriptor": "descriptor",
    "DescriptorOutput": "descriptor",
    "EnergyFitting": "fitting",
    "EnergyModel": "potential",
    "Potential": "potential",
    "Prediction": "potential",
    "predict": "potential",
    "extended_inputs": "potential",
    "MultiTaskModel": "multitask",
    "MultiTaskModelConfig": "multitask",
    "CompressedModel": "compressed",
    "TabulatedSeE2A": "compressed",
    "DenoiseHead": "denoise_head",
    "MASK": "config",
    "DenoiseNetConfig": "config",
    "evaluate": "infer",
    "evaluate_system": "infer",
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
