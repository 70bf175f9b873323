"""ContentV in JAX/Flax (linen): MM-DiT, Wan VAE, flow-matching training, RLHF, sampler."""
