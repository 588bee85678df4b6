"""Hand-written models: the KL autoencoder (vae), the conditional UNet (unet) and the CLIP text encoders (clip)."""
