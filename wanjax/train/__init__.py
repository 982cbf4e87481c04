"""Training the shipped mini Wan2.2 MoE (``python -m wanjax.train``).

Modules: `text` (mini tokenizer + frozen random mini UMT5), `vae` (mini VAE training, latent normalisation fold),
`dit` (flow-matching training of the base model and the two experts), `export_components` (official-layout
writers for the VAE and UMT5 ``.pth``), `evaluate` (held-out first-frame PSNR and motion-direction accuracy),
`cli` (the end-to-end script).
"""
