"""Sampling a checkpoint (sample.py, sample_ddp.py, quickstart.py; the trainers' live samples):

    flags             the scripts' flags; unset ones from the checkpoint; -> ModelSettings, SamplerSettings
    checkpoint_model  read a checkpoint; identify, build and load its model and VAE (ModelSettings)
    noise             per-index randomness: IndexNoise, grid_noise, draw_labels; slerp and WalkNoise (latent walks)
    guidance          the guided model call: make_model_fn
    samplers          the reverse process of each objective: ReverseProcess, SamplerSettings
    rf_samplers       REPA's Euler ODE and Euler-Maruyama SDE, with REPA's guidance (rf checkpoints)
    dpm_solver        DPM-Solver++(2M) on a DDPM model's epsilon
    generation        model_fn + sampler for the settings; latents -> images -> uint8 RGB
    sample_files      sample_ddp's PNG names and the .npz it packs
    pictures          sample.py's guidance sweep (a column per --cfg-scale) and its checks
"""
