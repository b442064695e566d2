"""Complete params for the small models and the CPU runtime of the unit tests. The typed params have no defaults, so
every field is written out here once; the tests change what they are about with `model_copy(update=...)`."""
from vqprior.config import ComputeParams, PriorModelParams, VQVAEModelParams


def cpu(**changes) -> ComputeParams:
    """The CPU in fp32 (or what `changes` say), torch's own thread count, no compilation."""
    return ComputeParams(**{"device": "cpu", "precision": "fp32", "threads": 0, "compile": False, "procs": 1, **changes})


SMALL_VQ = VQVAEModelParams(channels=16, res_blocks=1, encoder_res_blocks=None, downsamples=2, codebook_size=16,
                            code_dim=8, ema_decay=0.99, commitment=0.25, dead_code_steps=50, kmeans_iters=10,
                            l2_normalize=False, usage_entropy=0.0, recon_loss="mse")
SMALL_PRIOR = PriorModelParams(d_model=32, n_layers=2, n_heads=2, dropout=0.0, attn_dropout=0.0, token_noise=0.0,
                               num_classes=0, label_dropout=0.1)
