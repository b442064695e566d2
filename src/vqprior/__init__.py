"""vqprior: VQ-VAE + autoregressive Transformer prior, as a library. Knows nothing of DVC, Prefect or MLflow."""
__version__ = "0.1.0"
