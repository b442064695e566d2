import pytest
import yaml
from pydantic import BaseModel

from conftest import ROOT, params_with
from vqprior.config import Params, ParamsError, load_params, parse_params

PARAMS_FILES = ["params.yaml", *sorted(str(f.relative_to(ROOT)) for f in (ROOT / "profiles").glob("*.yaml"))]


@pytest.mark.parametrize("name", PARAMS_FILES)
def test_shipped_params_files_are_valid(name):
    p = load_params(ROOT / name)
    assert p.train_vqvae.model.codebook_size >= 5
    assert p.sample.num_samples > p.evaluate.prc_neighborhood


def model_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every dotted key of the typed params, sections included."""
    keys = set()
    for name, field in model.model_fields.items():
        keys.add(prefix + name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys |= model_keys(field.annotation, f"{prefix}{name}.")
    return keys


def file_keys(raw: dict, prefix: str = "") -> set[str]:
    return {prefix + k for k in raw} | {x for k, v in raw.items() if isinstance(v, dict) for x in file_keys(v, f"{prefix}{k}.")}


@pytest.mark.parametrize("name", PARAMS_FILES)
def test_params_files_and_the_typed_model_have_the_same_keys(name):
    """params.yaml and the typed model describe the same knobs: no key only in one of them."""
    raw = yaml.safe_load((ROOT / name).read_text())
    assert file_keys(raw) == model_keys(Params)


def test_the_typed_model_has_no_defaults():
    """params.yaml is the one source of default values: a default in the code could drift from it unseen."""
    def with_defaults(model: type[BaseModel], prefix: str = "") -> list[str]:
        found = []
        for name, field in model.model_fields.items():
            if not field.is_required():
                found.append(prefix + name)
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                found += with_defaults(field.annotation, f"{prefix}{name}.")
        return found

    assert with_defaults(Params) == []


def _error(changes, base="profiles/smoke.yaml"):
    with pytest.raises(ParamsError) as info:
        parse_params(params_with(changes, base), "params.yaml")
    return str(info.value)


def test_a_missing_key_is_named():
    raw = params_with()
    del raw["train_vqvae"]["model"]["code_dim"]
    with pytest.raises(ParamsError) as info:
        parse_params(raw, "params.yaml")
    assert str(info.value) == ("params.yaml: missing key 'train_vqvae.model.code_dim' (every key is "
                               "required; copy it from params.yaml); fix it and run again")


def test_unknown_key_is_named_with_its_dotted_path():
    msg = _error({"train_vqvae": {"train": {"learning_rate": 0.1}}})
    assert "train_vqvae.train.learning_rate" in msg and "unknown key" in msg
    assert "\n" not in msg


def test_wrong_type_and_range_are_named():
    assert "train_prior.train.epochs" in _error({"train_prior": {"train": {"epochs": "ten"}}})
    msg = _error({"sample": {"temperature": -1}})
    assert "sample.temperature" in msg and "greater than 0" in msg and "-1" in msg
    assert "top_p" in _error({"sample": {"top_p": 1.5}})


def test_conditioning_and_augmentation_keys_are_checked():
    assert "train_prior.model.attn_dropout" in _error({"train_prior": {"model": {"attn_dropout": 1.0}}})
    assert "train_prior.model.num_classes" in _error({"train_prior": {"model": {"num_classes": -1}}})
    assert "train_prior.model.label_dropout" in _error({"train_prior": {"model": {"label_dropout": 1.5}}})
    msg = _error({"sample": {"guidance": -0.5}})
    assert "sample.guidance" in msg and "greater than or equal to 0" in msg
    assert "extract_codes.hflip" in _error({"extract_codes": {"hflip": "sometimes"}})


def test_heads_must_divide_width():
    assert "n_heads" in _error({"train_prior": {"model": {"d_model": 100, "n_heads": 3}}})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_model_shapes_that_would_crash_later_are_refused_up_front():
    msg = _error({"train_vqvae": {"model": {"channels": 100, "downsamples": 2}}})  # GroupNorm(8, 50) would fail
    assert "train_vqvae.model" in msg and "[50, 100]" in msg and "multiple of 8" in msg and "try 16" in msg
    p = parse_params(params_with({"train_vqvae": {"model": {"channels": 48, "downsamples": 2}}}))
    assert p.train_vqvae.model.widths == [24, 48]
    assert "train_vqvae.model.codebook_size" in _error({"train_vqvae": {"model": {"codebook_size": 4}}})  # top-5


@pytest.mark.parametrize("key, section", [("num_reference", "evaluate"), ("num_samples", "sample")])
def test_sets_smaller_than_the_knn_neighbourhood_are_refused(key, section):
    msg = _error({section: {key: 3}, "evaluate": {"prc_neighborhood": 3} | ({key: 3} if section == "evaluate" else {})})
    assert f"{section}.{key} is 3" in msg and "prc_neighborhood (3)" in msg
