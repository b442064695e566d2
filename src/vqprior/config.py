"""Typed params: one pydantic model per section of params.yaml.

`load_params()` validates the whole file so that a typo anywhere fails at start-up
with the key's dotted name, before any heavy work.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ParamsError  # noqa: F401 (raised here; importers of the config find it here too)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Section):
    source: Literal["fashion_mnist", "mnist", "cifar10", "stl10", "image_folder"] = "fashion_mnist"
    root: str | None = Field(None, description="the data's folder, looked at first (image_folder: required)")
    download: bool = Field(True, description="fall back to torchvision's download if no local copy exists")
    image_size: int | None = Field(None, ge=8, description="side of the square prepared images; null: the source's "
                                   "own (image_folder: required)")
    channels: Literal[0, 1, 3] = Field(0, description="1 gray, 3 RGB; 0: the source's own (image_folder: RGB)")

    @model_validator(mode="after")
    def _folder_needs_root_and_size(self):
        if self.source == "image_folder" and (self.root is None or self.image_size is None):
            raise ValueError("source image_folder needs data.root (the folder) and data.image_size (e.g. 64)")
        return self


class ComputeParams(Section):
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 keeps torch's default")
    compile: bool = Field(False, description="torch.compile the training models (pays off on GPUs; not on 2 CPU cores)")


class PrepareParams(Section):
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.1, gt=0, lt=1, description="share held out as test when the source has no test split")
    max_train: int | None = Field(None, ge=100, description="subset of the train split (smoke runs)")
    max_test: int | None = Field(None, ge=50, description="subset of the test split (smoke runs)")
    drop_duplicates: bool = True
    near_duplicate_bits: int | None = Field(None, ge=0, le=16, description="also drop an image whose 64-bit perceptual "
                                            "hash is within this many bits of an earlier one's; null: off")
    min_size: int = Field(16, ge=1, description="files whose shorter side is below this many pixels are dropped")
    max_aspect: float = Field(4.0, ge=1, description="files whose long side / short side exceeds this are dropped")
    workers: int = Field(0, ge=0, description="processes decoding image files; 0: all cores")
    normalisation: Literal["scale", "standardize"] = Field(
        "scale", description="scale: pixels to [-1, 1]; standardize: per channel (x - mean) / std with train statistics")


class TrainParams(Section):
    """Optimisation knobs shared by the VQ-VAE and the prior."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="max grad norm; 0 disables clipping")
    patience: int = Field(3, ge=1, description="epochs without val improvement before stopping")


class VQVAEModelParams(Section):
    channels: int = Field(64, ge=8)
    res_blocks: int = Field(2, ge=0, description="residual blocks at the code grid's resolution in the decoder")
    encoder_res_blocks: int | None = Field(None, ge=0, description="the encoder's; null: as many as the decoder's. "
                                           "Fewer give more local codes (an easier prior) and faster extraction")
    downsamples: int = Field(2, ge=1, le=4)
    codebook_size: int = Field(256, ge=5, le=65535)  # codes are stored as uint16; the prior reports top-5 accuracy
    code_dim: int = Field(32, ge=2)
    ema_decay: float = Field(0.99, gt=0, lt=1)
    commitment: float = Field(0.25, ge=0)
    dead_code_steps: int = Field(50, ge=1, description="steps unused before a code is restarted")
    kmeans_iters: int = Field(10, ge=0, description="k-means steps on the first batch's encoder outputs; 0 samples them")
    l2_normalize: bool = Field(False, description="look codes up by cosine similarity of l2-normalised vectors")
    usage_entropy: float = Field(0.0, ge=0, description="weight of a loss that spreads code use evenly (raises the "
                                 "perplexity); 0: off")
    recon_loss: Literal["mse", "l1"] = "mse"

    @property
    def widths(self) -> list[int]:
        """Channels after each downsampling, the last at the code grid: half as wide per step up, at least 16."""
        return [max(self.channels // 2 ** (self.downsamples - 1 - i), 16) for i in range(self.downsamples)]

    @model_validator(mode="after")
    def _widths_fit_groupnorm(self):
        if any(w % 8 for w in [*self.widths, self.channels]):
            raise ValueError(f"channels {self.channels} gives layer widths {self.widths}: each must be a multiple of 8 "
                             f"(GroupNorm's 8 groups); try {8 * 2 ** (self.downsamples - 1)}, or a multiple of it")
        return self


class HealthParams(Section):
    """When a trained VQ-VAE counts as collapsed (reported in the output and metrics)."""

    min_codebook_usage: float = Field(0.05, ge=0, le=1, description="share of the codebook the test codes must use")
    min_perplexity: float = Field(2.0, ge=0, description="effective number of codes (exp of the code entropy) below "
                                  "which the codebook has collapsed")
    stop: bool = Field(False, description="fail the stage (no model written) when the run collapsed")


class TrainVQVAEParams(Section):
    model: VQVAEModelParams = VQVAEModelParams()
    train: TrainParams = TrainParams()
    health: HealthParams = HealthParams()
    hflip: bool = Field(False, description="random horizontal flips of training images")


class ExtractCodesParams(Section):
    batch_size: int = Field(1024, ge=1)
    hflip: bool = Field(False, description="also encode each train image flipped left-right, as an extra row tagged 'hflip'")


class PriorModelParams(Section):
    d_model: int = Field(256, ge=16)
    n_layers: int = Field(4, ge=1)
    n_heads: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    attn_dropout: float = Field(0.0, ge=0, lt=1, description="share of attention-matrix positions masked at random while training")
    token_noise: float = Field(0.0, ge=0, lt=1, description="share of input codes replaced by random codes while training")
    num_classes: int = Field(0, ge=0, description="0: unconditional; else a class token replaces START")
    label_dropout: float = Field(0.1, ge=0, le=1, description="chance a training label becomes the null class (for guidance)")

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        return self


class TrainPriorParams(Section):
    model: PriorModelParams = PriorModelParams()
    train: TrainParams = TrainParams()


class SampleParams(Section):
    num_samples: int = Field(2000, ge=1)
    batch_size: int = Field(250, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    top_p: float = Field(1.0, gt=0, le=1, description="1.0 disables nucleus sampling")
    guidance: float = Field(1.0, ge=0, description="classifier-free guidance of a conditional prior: 0 unconditional, 1 plain conditional, > 1 stronger")
    seeds: int = Field(1, ge=1, description="sample sets drawn, with seeds seed, seed + 1, ...: the first is the "
                       "headline, `evaluate` reports the spread over all (sampling noise)")


class SweepParams(Section):
    """The sampling grid: every temperature x top_k x top_p x guidance point is sampled and scored (stages
    sweep_point, sweep)."""

    temperature: list[Annotated[float, Field(gt=0)]] = Field([1.0], min_length=1)
    top_k: list[Annotated[int, Field(ge=0)]] = Field([0], min_length=1, description="0 disables top-k")
    top_p: list[Annotated[float, Field(gt=0, le=1)]] = Field([1.0], min_length=1, description="1.0 disables top-p")
    guidance: list[Annotated[float, Field(ge=0)]] = Field([1.0], min_length=1, description="classifier-free guidance "
                                                          "scales of a conditional prior (1: plain conditional)")

    @model_validator(mode="after")
    def _no_repeats(self):
        for name in ("temperature", "top_k", "top_p", "guidance"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} lists a value twice: {values}")
        return self


class ClassifierModelParams(Section):
    channels: int = Field(16, ge=4, description="width of the first conv block; the second is twice as wide")
    feature_dim: int = Field(128, ge=8, description="width of the penultimate layer, the feature space for FID")


class TrainClassifierParams(Section):
    model: ClassifierModelParams = ClassifierModelParams()
    train: TrainParams = TrainParams(epochs=4, batch_size=256, lr=5e-3, warmup_steps=100, patience=2)


class EvaluateParams(Section):
    num_reference: int = Field(2000, ge=2, description="test images used as the real set")
    batch_size: int = Field(50, ge=1)
    prc_neighborhood: int = Field(3, ge=1, description="k of the k-NN precision/recall")
    inception_bf16: bool = Field(False, description="Inception in bf16: faster on CPUs with AVX-512 BF16/AMX, FID "
                                 "shifts slightly (benchmarks/inception_speed.py); fp32 is the standard protocol")


class TrackingParams(Section):
    experiment: str = "vqprior"


class Params(Section):
    seed: int = Field(1234, ge=0)
    data: DataParams = DataParams()
    compute: ComputeParams = ComputeParams()
    prepare: PrepareParams = PrepareParams()
    train_vqvae: TrainVQVAEParams = TrainVQVAEParams()
    extract_codes: ExtractCodesParams = ExtractCodesParams()
    train_prior: TrainPriorParams = TrainPriorParams()
    sample: SampleParams = SampleParams()
    sweep: SweepParams = SweepParams()
    train_classifier: TrainClassifierParams = TrainClassifierParams()
    evaluate: EvaluateParams = EvaluateParams()
    tracking: TrackingParams = TrackingParams()

    @model_validator(mode="after")
    def _enough_images_for_knn(self):
        k = self.evaluate.prc_neighborhood
        for key, n in (("evaluate.num_reference", self.evaluate.num_reference), ("sample.num_samples", self.sample.num_samples)):
            if n <= k:
                raise ValueError(f"{key} is {n}, but precision/recall need more than evaluate.prc_neighborhood ({k}) "
                                 "images per set: raise it")
        return self

    @model_validator(mode="after")
    def _keys_agree(self):
        """Values that are each valid but contradict each other, caught before any work."""
        codebook = self.train_vqvae.model.codebook_size
        for key, values in (("sample.top_k", [self.sample.top_k]), ("sweep.top_k", self.sweep.top_k)):
            if any(k >= codebook for k in values):
                raise ValueError(f"{key} is {values if len(values) > 1 else values[0]}, but top-k of the "
                                 f"train_vqvae.model.codebook_size ({codebook}) codes or more keeps them all: use a "
                                 f"value below {codebook}, or 0 (off)")
        if self.prepare.val_fraction + self.prepare.test_fraction >= 1:
            raise ValueError(f"prepare.val_fraction ({self.prepare.val_fraction}) + prepare.test_fraction "
                             f"({self.prepare.test_fraction}) leave no train images: keep their sum below 1")
        if self.prepare.max_test is not None and self.evaluate.num_reference > self.prepare.max_test:
            raise ValueError(f"evaluate.num_reference ({self.evaluate.num_reference}) is more than the "
                             f"prepare.max_test ({self.prepare.max_test}) test images kept: lower it or raise max_test")
        return self

    @model_validator(mode="after")
    def _guidance_needs_classes(self):
        if self.train_prior.model.num_classes == 0 and len(self.sweep.guidance) > 1:
            raise ValueError(f"sweep.guidance lists {self.sweep.guidance}, but an unconditional prior "
                             "(train_prior.model.num_classes 0) ignores guidance: keep one value")
        return self


def _describe(error: dict) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if not key and error["type"] == "value_error":  # a check across sections: its text names the keys
        return str(error["ctx"]["error"]) if "ctx" in error else error["msg"]
    key = key or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    got = error.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"'{key}': {error['msg']}{shown}"


def parse_params(raw: dict, source: str = "params") -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ParamsError(f"{source}: {_describe(first)}{more}; fix it and run again") from None


class _DuplicateKey(yaml.YAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key written twice in one mapping is an error: plain YAML keeps the last,
    so an edit to the first copy would silently do nothing."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(f"key '{key}' appears twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path} not found; run from the project root or copy a file from profiles/")
    try:
        raw = yaml.load(path.read_text(), Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as exc:
        raise ParamsError(f"{path}: {exc}; keep one") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML ({exc.__class__.__name__}); fix the syntax") from None
    except UnicodeDecodeError:
        raise ParamsError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise ParamsError(f"{path} cannot be read ({exc.strerror}); check the file") from None
    if raw is None:  # an empty file would silently run the full-size defaults
        raise ParamsError(f"{path} is empty; copy params.yaml or a file from profiles/ to it")
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    return parse_params(raw, str(path))
