"""lamflow.model.nn: the network: model configs, the smooth environment matrix, MLPs,
descriptors (se_e2_a, se_atten, dpa2, dpa3), the energy fitting net and the potential."""
