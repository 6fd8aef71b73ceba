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


# --- a run folder's saved config, read by today's code ------------------------------------------------------


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("method", METHOD_FILES)
def test_a_complete_saved_config_comes_back_unchanged(method, scale):
    from omegaconf import OmegaConf

    from benchmarks.config import saved_run_config, to_container

    cfg = load_config([f"method={method}", f"scale={scale}"])
    again, reset = saved_run_config(OmegaConf.create(to_container(cfg)), cfg.dataset.name, "config.yaml")
    assert reset == {}
    assert to_container(again) == to_container(cfg)


@pytest.mark.parametrize("method", ["cmd", "pvdm"])
def test_a_saved_config_that_predates_a_key_gets_the_behaviour_before_it(method):
    """A run written before `method.autoencoder.loss` existed trained the L1 autoencoder; today's tiny preset asks
    for a PatchGAN. Read back, the run must build the L1 model, whose checkpoint it holds, not the preset's."""
    from omegaconf import OmegaConf

    from benchmarks.common import build_method
    from benchmarks.config import merge_overrides, saved_run_config, to_container
    from methods.base import DataSpec

    today = load_config([f"method={method}", "scale=tiny"])
    assert today.method.autoencoder.loss.gan.weight > 0  # the preset this test is about
    old = to_container(today)
    del old["method"]["autoencoder"]["loss"]
    old["method"]["autoencoder"]["patch"] = 2  # a key the run does hold keeps its saved value
    saved = OmegaConf.create(old)

    cfg, reset = saved_run_config(saved, "shapes", "old/config.yaml")
    assert cfg.method.autoencoder.loss.gan.weight == 0.0
    assert reset["method.autoencoder.loss.gan.weight"] == (today.method.autoencoder.loss.gan.weight, 0.0)
    assert cfg.method.autoencoder.patch == 2 and "method.autoencoder.patch" not in reset
    assert all(k.startswith("method.autoencoder.loss.") for k in reset)
    naive = merge_overrides(load_config([f"method={method}", "scale=tiny"]), saved, "old/config.yaml")
    assert naive.method.autoencoder.loss.gan.weight > 0  # what the saved config alone would have built

    spec = DataSpec(channels=3, frames=today.dataset.frames, height=32, width=32, num_classes=8)
    l1 = merge_overrides(today, ["method.autoencoder.loss.gan.weight=0", "method.autoencoder.patch=2"], "test")
    for key, (_, used) in reset.items():
        l1 = merge_overrides(l1, [f"{key}={used}"], "test")
    state = build_method(l1, spec).state_dict()
    build_method(cfg, spec).load_state_dict(state)  # strict: the same modules, no discriminators
    with pytest.raises(RuntimeError, match="autoencoder_loss.disc"):
        build_method(naive, spec).load_state_dict(state)
