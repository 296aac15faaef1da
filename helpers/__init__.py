"""What the top-level scripts share, grouped by what it serves (scripts pass values, not `args`):

    data/        reading images and latents, the VAE, the resumable data order
    training/    flags, building a run, run folders and checkpoints, objectives, REPA, monitoring
    sampling/    model loading for sampling, samplers, noise and guidance, sample files
    evaluation/  FID/IS/precision/recall math, the Inception wrapper, the digits judge
    utils/       the one error type, torchrun set-up, locks, atomic files, safe checkpoint
                 reading, the seed rule, the log, the fast path, the model registry
"""
