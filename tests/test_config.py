from pathlib import Path

import pytest
import yaml

from vqprior.config import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["params.yaml", "profiles/smoke.yaml"])
def test_shipped_params_files_are_valid(name):
    p = load_params(ROOT / name)
    assert p.train_vqvae.model.codebook_size >= 2
    assert p.sample.num_samples >= 1


def test_params_files_list_every_key():
    """The shipped files are complete: every section and key of the typed model is written out."""
    defaults = parse_params({}).model_dump()
    for name in ["params.yaml", "profiles/smoke.yaml"]:
        raw = yaml.safe_load((ROOT / name).read_text())

        def keys(d, prefix=""):
            return {f"{prefix}{k}" for k in d} | {x for k, v in d.items() if isinstance(v, dict) for x in keys(v, f"{prefix}{k}.")}

        assert keys(raw) == keys(defaults), name


def _error(raw):
    with pytest.raises(ParamsError) as info:
        parse_params(raw, "params.yaml")
    return str(info.value)


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
    p = parse_params({})
    assert p.train_prior.model.num_classes == 0 and p.train_prior.model.attn_dropout == 0.0
    assert p.sample.guidance == 1.0 and p.extract_codes.hflip is False
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
    msg = _error({"train_vqvae": {"model": {"channels": 100}}})  # GroupNorm(8, 50) would fail in the stage
    assert "train_vqvae.model" in msg and "[50, 100]" in msg and "multiple of 8" in msg and "try 16" in msg
    assert parse_params({"train_vqvae": {"model": {"channels": 48, "downsamples": 2}}}).train_vqvae.model.widths == [24, 48]
    assert "train_vqvae.model.codebook_size" in _error({"train_vqvae": {"model": {"codebook_size": 4}}})  # top-5


@pytest.mark.parametrize("key, section", [("num_reference", "evaluate"), ("num_samples", "sample")])
def test_sets_smaller_than_the_knn_neighbourhood_are_refused(key, section):
    msg = _error({section: {key: 3}, "evaluate": {"prc_neighborhood": 3} | ({key: 3} if section == "evaluate" else {})})
    assert f"{section}.{key} is 3" in msg and "prc_neighborhood (3)" in msg
