"""Config composition and the errors that say how to fix a mistake."""

from pathlib import Path

import pytest

from benchmarks.config import CONFIG_DIR, ConfigError, config_hash, load_config, stage_settings
from datamodules import DATASETS
from methods import METHODS

METHOD_FILES = sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml"))
DATASET_FILES = sorted(p.stem for p in (CONFIG_DIR / "dataset").glob("*.yaml"))
SCALES = sorted(p.stem for p in (CONFIG_DIR / "scale").glob("*.yaml"))


def test_every_method_has_a_config_file_and_back():
    assert set(METHOD_FILES) == set(METHODS)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("scale", SCALES)
def test_every_method_config_composes_at_every_scale(method, scale):
    cfg = load_config([f"method={method}", f"scale={scale}"])
    assert cfg.method.name == method and cfg.scale == scale
    assert set(cfg.stages) <= set(METHODS[method].stages)


@pytest.mark.parametrize("dataset", DATASET_FILES)
def test_every_dataset_config_composes(dataset):
    cfg = load_config([f"dataset={dataset}"])
    assert cfg.dataset.name in DATASETS


def test_misspelled_key_names_the_nearest_valid_key():
    with pytest.raises(ConfigError, match=r"trainer\.max_stpes.*did you mean 'trainer\.max_steps'"):
        load_config(["trainer.max_stpes=5"])
    with pytest.raises(ConfigError, match=r"did you mean 'method\.unet\.channels'"):
        load_config(["method=vdm", "method.unet.chanels=[8]"])


def test_unknown_method_dataset_and_scale_list_the_valid_ones():
    with pytest.raises(ConfigError, match="choose one of: .*vdm"):
        load_config(["method=vmd"])
    with pytest.raises(ConfigError, match="choose one of: .*shapes"):
        load_config(["dataset=shape"])
    with pytest.raises(ConfigError, match="choose one of: .*tiny"):
        load_config(["scale=huge"])


def test_wrong_type_and_malformed_override():
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        load_config(["trainer.max_steps=many"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(["trainer.max_steps"])


def test_unknown_stage_is_rejected():
    with pytest.raises(ConfigError, match="no such stage"):
        load_config(["method=vdm", "stages.autoencoder.max_steps=3"])


def test_layer_precedence_and_stage_overrides():
    cfg = load_config(["method=vdm", "scale=test", "trainer.max_steps=7", "stages.denoiser.lr=0.5"])
    assert cfg.trainer.max_steps == 7  # command line beats every file
    assert cfg.dataset.resolution == 16  # scale=test beats configs/dataset/shapes.yaml
    s = stage_settings(cfg, "denoiser")
    assert s["max_steps"] == 7 and s["lr"] == 0.5


def test_config_hash_ignores_paths_but_not_science(tmp_path: Path):
    a = load_config(["scale=test", f"runs_root={tmp_path}"])
    b = load_config(["scale=test", "runs_root=elsewhere", "tag=x"])
    c = load_config(["scale=test", "seed=1"])
    assert config_hash(a) == config_hash(b) != config_hash(c)
