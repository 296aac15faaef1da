"""Training a model: flags, building a run, run folders and resume state, objectives (DDPM, SiT, REPA), live grids and FID, TensorBoard/W&B."""
