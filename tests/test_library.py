"""The library from plain Python, as in a notebook: no params file, no DVC repo, no MLflow. It builds, trains, encodes,
samples and scores, and its errors are exceptions a caller can catch, never an exit of the process."""
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from vqprior.codes import CodeWriter, read_codes
from small_params import SMALL_PRIOR, SMALL_VQ, cpu
from vqprior.config import TrainParams
from vqprior.data.images import Normalisation
from vqprior.errors import InputError, VqpriorError
from vqprior.extractors import TINY
from vqprior.metrics import fidelity_metrics
from vqprior.models import save_model
from vqprior.models.prior import Prior, load_prior
from vqprior.models.vqvae import VQVAE, load_vqvae
from vqprior.runtime import resolve_runtime
from vqprior.sampling import generate
from vqprior.training import fit

SRC = Path(__file__).resolve().parents[1] / "src"
CPU = resolve_runtime(cpu())


def shapes(n: int, seed: int = 0) -> np.ndarray:
    """n 16x16 gray images: a bright square of random size and place on a dark ground (uint8, N x H x W x 1)."""
    rng = np.random.default_rng(seed)
    images = np.full((n, 16, 16, 1), 20, np.uint8)
    for img in images:
        size = rng.integers(4, 10)
        top, left = rng.integers(0, 16 - size, 2)
        img[top : top + size, left : left + size] = 230
    return images


def test_build_train_encode_sample_score_from_plain_python(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing of a pipeline here: no params.yaml, no dvc.yaml, no mlflow.db
    torch.manual_seed(0)
    norm = Normalisation()
    x = norm.to_model(shapes(96))
    vq = VQVAE(SMALL_VQ.model_copy(update=dict(res_blocks=0, codebook_size=8, code_dim=4, kmeans_iters=2)),
               in_channels=1, normalisation=norm)

    def vq_step(idx):
        loss, stats, _ = vq.loss(x[idx])
        return loss, stats

    def vq_val():
        recon, _, _ = vq(x[:32])
        return {"mse": float(((norm.to_unit(recon) - norm.to_unit(x[:32])) ** 2).mean())}

    train = TrainParams(epochs=2, batch_size=16, lr=3e-3, weight_decay=0.0, warmup_steps=2, grad_clip=1.0, patience=3)
    result = fit(vq, len(x), vq_step, vq_val, train, CPU, seed=0, checkpoint=tmp_path / "vq.ckpt", monitor="mse")
    assert result.epochs == 2 and result.history[-1]["val_mse"] < result.history[0]["train_mse"]

    codes = vq.encode(x)
    assert codes.shape == (96, 4, 4) and 0 <= int(codes.min()) and int(codes.max()) < 8
    meta = {"grid_height": 4, "grid_width": 4, "codebook_size": 8, "image_shape": [16, 16, 1],
            "vqvae_sha256": "0" * 64, "data_sha256": "0" * 64}
    with CodeWriter(tmp_path / "codes.parquet", "train", meta) as writer:
        writer.write(codes.numpy(), np.full(96, -1), np.arange(96))
    store = read_codes(tmp_path / "codes.parquet")
    assert np.array_equal(store.codes, codes.numpy()) and store.codebook_size == 8 and (store.labels == -1).all()

    flat = torch.from_numpy(store.codes.reshape(96, 16).astype("int64"))
    prior = Prior(SMALL_PRIOR.model_copy(update=dict(d_model=16, n_layers=1)), vocab=8, length=16)

    def prior_val():
        return {"nll": float(prior.loss(flat[:32])[1]["nll"])}

    before = prior_val()["nll"]
    fit(prior, 96, lambda idx: prior.loss(flat[idx]), prior_val, train, CPU, seed=0, checkpoint=tmp_path / "p.ckpt",
        monitor="nll")
    assert prior_val()["nll"] < before <= math.log(8) + 0.5  # learnt something from a start near uniform

    save_model(tmp_path / "vq.pt", vq, in_channels=1, image_shape=[16, 16, 1], normalisation=norm.as_dict())
    save_model(tmp_path / "prior.pt", prior, vocab=8, length=16, grid=[4, 4])
    vq2, _ = load_vqvae(tmp_path / "vq.pt")
    prior2, _ = load_prior(tmp_path / "prior.pt")
    out = generate(prior2, vq2, (4, 4), CPU, num_samples=24, batch_size=12, seed=0)
    assert out.images.shape == (24, 1, 16, 16) and out.images.dtype == torch.uint8
    assert out.codes.shape == (24, 4, 4) and out.labels is None

    real = torch.from_numpy(shapes(24, seed=1)).permute(0, 3, 1, 2).contiguous()
    noise = torch.randint(0, 256, (24, 1, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    to_samples = fidelity_metrics(out.images, real, extractor=TINY, batch_size=12)
    to_noise = fidelity_metrics(noise, real, extractor=TINY, batch_size=12)
    assert 0 < to_samples["fid"] < to_noise["fid"]  # samples of learnt squares are nearer real squares than noise
    assert 0 <= to_samples["precision"] <= 1 and 0 <= to_samples["recall"] <= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.parquet", "p.ckpt", "prior.pt", "vq.ckpt", "vq.pt"]


def test_library_errors_are_exceptions_a_caller_catches(tmp_path):
    with pytest.raises(InputError) as info:
        load_vqvae(tmp_path / "vqvae.pt")
    err = info.value
    assert isinstance(err, VqpriorError) and not isinstance(err, SystemExit)
    assert (err.path, err.writer, err.missing) == (tmp_path / "vqvae.pt", "train_vqvae", True)
    assert str(err) == f"{tmp_path / 'vqvae.pt'} not found; run the 'train_vqvae' step that writes it first"


def test_the_library_never_exits_and_knows_no_pipeline_tool():
    found = [f"{path.relative_to(SRC)}:{n}: {line.strip()}" for path in sorted(SRC.rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if re.search(r"SystemExit|sys\.exit|\bexit\(|dvc", line, re.IGNORECASE)]
    assert found == []
