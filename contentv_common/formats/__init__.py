"""Weight formats without a framework: the torch <-> Flax key maps of each component (with the shapes a config
implies), and numpy readers of every weight format on disk that needs neither torch nor JAX. `convert` (the CLI
and the writers) and `contentv_jax` (`--init-from`, the VAE and CLIP loaders) both import from here."""
