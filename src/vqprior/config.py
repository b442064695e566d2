"""Typed params: one pydantic model per section of params.yaml.

`load_params()` validates the whole file so that a typo anywhere fails at start-up
with the key's dotted name, before any heavy work.

The fields have no defaults: params.yaml (or a complete file from profiles/) is the one source of every value, and
its comment beside each key is the one description of it. These models only check types, ranges and combinations.
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
    source: Literal["fashion_mnist", "mnist", "cifar10", "stl10", "image_folder"]
    root: str | None
    download: bool
    image_size: int | None = Field(ge=8)
    channels: Literal[0, 1, 3]

    @model_validator(mode="after")
    def _folder_needs_root_and_size(self):
        if self.source == "image_folder" and (self.root is None or self.image_size is None):
            raise ValueError("source image_folder needs data.root (the folder) and data.image_size (e.g. 64)")
        return self


class ComputeParams(Section):
    device: Literal["auto", "cpu", "cuda", "mps"]
    precision: Literal["auto", "fp32", "bf16"]
    threads: int = Field(ge=0)
    compile: bool
    procs: int = Field(ge=1, le=64)


class PrepareParams(Section):
    val_fraction: float = Field(gt=0, lt=1)
    test_fraction: float = Field(gt=0, lt=1)
    max_train: int | None = Field(ge=100)
    max_test: int | None = Field(ge=50)
    drop_duplicates: bool
    near_duplicate_bits: int | None = Field(ge=0, le=16)
    min_size: int = Field(ge=1)
    max_aspect: float = Field(ge=1)
    workers: int = Field(ge=0)
    normalisation: Literal["scale", "standardize"]


class TrainParams(Section):
    """Optimisation knobs shared by the VQ-VAE and the prior."""

    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0, le=1)
    weight_decay: float = Field(ge=0)
    warmup_steps: int = Field(ge=0)
    grad_clip: float = Field(ge=0)
    patience: int = Field(ge=1)


class PriorTrainParams(TrainParams):
    """The prior's optimisation knobs: TrainParams and the optimiser (its Transformer has the hidden matrices Muon
    is for; the convolutional models train with AdamW)."""

    optimizer: Literal["adamw", "muon"]


class VQVAEModelParams(Section):
    channels: int = Field(ge=8)
    res_blocks: int = Field(ge=0)
    encoder_res_blocks: int | None = Field(ge=0)
    downsamples: int = Field(ge=1, le=4)
    codebook_size: int = Field(ge=5, le=65535)  # codes are stored as uint16; the prior reports top-5 accuracy
    code_dim: int = Field(ge=2)
    ema_decay: float = Field(gt=0, lt=1)
    commitment: float = Field(ge=0)
    dead_code_steps: int = Field(ge=1)
    kmeans_iters: int = Field(ge=0)
    l2_normalize: bool
    usage_entropy: float = Field(ge=0)
    recon_loss: Literal["mse", "l1"]

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


class VQVAEHealthParams(Section):
    """When a trained VQ-VAE counts as collapsed (reported in the output and metrics)."""

    min_codebook_usage: float = Field(ge=0, le=1)
    min_perplexity: float = Field(ge=0)
    min_loss_drop: float = Field(ge=0, lt=1)
    stop: bool


class TrainVQVAEParams(Section):
    model: VQVAEModelParams
    train: TrainParams
    health: VQVAEHealthParams
    hflip: bool


class ExtractCodesParams(Section):
    batch_size: int = Field(ge=1)
    hflip: bool


class PriorModelParams(Section):
    d_model: int = Field(ge=16)
    n_layers: int = Field(ge=1)
    n_heads: int = Field(ge=1)
    dropout: float = Field(ge=0, lt=1)
    attn_dropout: float = Field(ge=0, lt=1)
    token_noise: float = Field(ge=0, lt=1)
    num_classes: int = Field(ge=0)
    label_dropout: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        return self


class PriorHealthParams(Section):
    """When a trained prior counts as collapsed (reported in the output and metrics)."""

    min_gain: float = Field(ge=0, lt=1)
    min_loss_drop: float = Field(ge=0, lt=1)
    stop: bool


class TrainPriorParams(Section):
    model: PriorModelParams
    train: PriorTrainParams
    health: PriorHealthParams


class SampleParams(Section):
    num_samples: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    temperature: float = Field(gt=0)
    top_k: int = Field(ge=0)
    top_p: float = Field(gt=0, le=1)
    guidance: float = Field(ge=0)
    seeds: int = Field(ge=1)


class SweepParams(Section):
    """The sampling grid: every temperature x top_k x top_p x guidance point is sampled and scored (stages
    sweep_point, sweep). An empty list empties the grid: the sweep then holds `evaluate`'s point alone, and no
    sweep_point stage exists (each point costs as much Inception time as one sample set)."""

    temperature: list[Annotated[float, Field(gt=0)]]
    top_k: list[Annotated[int, Field(ge=0)]]
    top_p: list[Annotated[float, Field(gt=0, le=1)]]
    guidance: list[Annotated[float, Field(ge=0)]]

    @model_validator(mode="after")
    def _no_repeats(self):
        for name in ("temperature", "top_k", "top_p", "guidance"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} lists a value twice: {values}")
        return self


class ClassifierModelParams(Section):
    channels: int = Field(ge=4)
    feature_dim: int = Field(ge=8)


class TrainClassifierParams(Section):
    model: ClassifierModelParams
    train: TrainParams


class EvaluateParams(Section):
    num_reference: int = Field(ge=2)
    batch_size: int = Field(ge=1)
    prc_neighborhood: int = Field(ge=1)
    inception_precision: Literal["auto", "fp32", "bf16"]


class TrackingParams(Section):
    experiment: str
    required: bool


class Params(Section):
    seed: int = Field(ge=0)
    data: DataParams
    compute: ComputeParams
    prepare: PrepareParams
    train_vqvae: TrainVQVAEParams
    extract_codes: ExtractCodesParams
    train_prior: TrainPriorParams
    sample: SampleParams
    sweep: SweepParams
    train_classifier: TrainClassifierParams
    evaluate: EvaluateParams
    tracking: TrackingParams

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
        for stage in ("train_vqvae", "train_classifier", "train_prior"):
            if (batch := getattr(self, stage).train.batch_size) < self.compute.procs:
                raise ValueError(f"{stage}.train.batch_size ({batch}) is smaller than compute.procs "
                                 f"({self.compute.procs}): each process needs a share of every batch; lower procs")
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
    if error["type"] == "missing":
        return f"missing key '{key}' (every key is required; copy it from params.yaml)"
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
