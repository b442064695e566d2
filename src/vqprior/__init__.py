"""vqprior: VQ-VAE + autoregressive Transformer prior, as a library. Knows nothing of the tools that drive it (pipeline, tracking, scheduling)."""
__version__ = "0.1.0"
