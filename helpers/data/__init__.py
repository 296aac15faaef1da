"""Reading what the models train on: class folders and built-in sets, latents (per-file and packed), the VAE, the resumable data order."""
