"""Run configuration: structured schemas, layered YAML composition, and errors that name the fix.

A run config is composed, later layers winning:
    configs/default.yaml
    configs/dataset/<dataset>.yaml
    configs/method/<method>.yaml
    configs/scale/<scale>.yaml                     generic preset (tiny, paper, test)
    the dataset file's `scales.<scale>` section    dataset-specific preset
    the method file's `scales.<scale>` section     method-specific preset
    command-line dotlist                           (`trainer.max_steps=5`)
`method=<name>`, `dataset=<name>` and `scale=<name>` pick the files. Every layer is merged
into a structured schema (the method's and dataset's own `Config` dataclasses), so a
misspelled key is an error naming the nearest valid key, never a silently ignored value.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from benchmarks.config_keys import ABSENT_AT_DEFAULT, HOW_KEYS
from datamodules.base import LoaderConfig
from evaluation.config import EvalConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SELECTORS = ("method", "dataset", "scale")


class ConfigError(ValueError):
    """A configuration mistake, with a message that says how to fix it."""


@dataclass
class TrainerConfig:
    max_steps: int = 300  # optimiser steps per stage (a stage may override it under `stages`)
    # "auto": bf16-mixed where bf16 matmuls are native (CUDA with bf16, a CPU with AMX / AVX512-BF16 units:
    # measured 1.6-2.6x faster per step), else 32-true (an AVX2-only CPU runs bf16 ~150x slower); resolved
    # by load_config, so the saved config and the results row hold the precision that ran
    precision: str = "auto"
    accelerator: str = "auto"
    devices: Any = 1  # int or "auto"; >1 with strategy=ddp for multi-process training
    num_nodes: int = 1
    strategy: str = "auto"  # "ddp", "ddp_spawn" (CPU tests), ...
    gradient_clip_val: float = 1.0
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 100  # last.ckpt is refreshed this often (resume point)
    deterministic: bool = False
    progress_bar: bool = True
    # seconds of training for the whole run, every stage together (an equal-budget race: benchmarks.race); the
    # stages share it in proportion to their preset steps x measured s/step and stop on time (benchmarks.run)
    time_budget: float | None = None
    # speed options (methods.speed; measured per method by benchmarks.speedups): torch.compile (inductor) of the
    # networks each stage's loss and the sampler call, conv weights in channels-last layout, and the attention
    # kernel of the transformers on CPU (auto | math | fused)
    compile: bool = False
    channels_last: bool = False
    attention: str = "auto"
    # default (glibc's malloc as it starts) | reuse (it keeps large freed blocks: methods.speed.tune_allocator;
    # bit-identical results; measured per method and part by benchmarks.allocator)
    allocator: str = "default"
    # false | auto | true (off / on): train a method's independent stages (CMD's image prior and autoencoder, then
    # its content and motion stages) side by side, each in a worker process with a share of the CPU cores
    # (benchmarks.stage_pool). auto: on CPU in one process without a time budget, with two or more cores, when the
    # dry pass predicts over a minute of training. Off by default: 1.07-1.15x on the default run, while its FVD
    # and R-FVD were worse in all three measured pairs (README, "Stages side by side")
    parallel_stages: str = "false"
    # MiB of a frozen encoder's outputs kept per clip (methods.speed.EncodingCache; 0: off; CPU only): CMD's content
    # and motion stages, PVDM's diffusion and ED-VDM's denoiser encode each distinct training clip once, not once
    # per visit. The default CMD run: 1.09x, the same weights bit for bit, 128 MiB (README, "The encoding cache")
    encoding_cache: float = 1024.0


@dataclass
class OptimConfig:
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 50  # linear LR warm-up
    ema_decay: float = 0.999  # 0 disables EMA
    ema_start_step: int = 0
    # after the warm-up: constant (none), or decaying to 0 at the end of each stage (linear | cosine) from
    # lr_decay_start (a fraction of the stage's steps, or of its seconds under trainer.time_budget) on
    lr_decay: str = "none"
    lr_decay_start: float = 0.0


@dataclass
class StageConfig:
    """Per-stage overrides; None keeps the run-wide value."""

    max_steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    ema_decay: float | None = None
    betas: list[float] | None = None


@dataclass
class SampleConfig:
    num_videos: int = 16  # written to samples/ as mp4 + PNG grid
    steps: int = 50  # sampler steps (a method may use its own per-stage steps)
    guidance: float = 2.0  # CFG scale s in eps = eps(null) + s * (eps(c) - eps(null)); 1 = no guidance
    eta: float = 0.0  # DDIM eta: 0 deterministic, 1 stochastic
    batch_size: int = 16
    fps: int = 8


@dataclass
class RunConfig:
    method: Any = None  # the method's own Config dataclass
    dataset: Any = None  # the dataset's own Config dataclass
    data: LoaderConfig = field(default_factory=LoaderConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stages: dict[str, StageConfig] = field(default_factory=dict)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scale: str = "tiny"
    seed: int = 0
    run_dir: str | None = None  # reuse a folder to resume a run; default runs/<method>-<dataset>-<time>
    runs_root: str = "runs"
    results: str = "results/results.jsonl"  # the append-only results store
    cache_dir: str = "cache"  # shared stage weights (image prior), real statistics, decoded clips
    tag: str = ""  # free label (sweeps set it)


def _choices(kind: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))


def _load_yaml(path: Path) -> DictConfig:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    return OmegaConf.load(path)


def _valid_keys(schema: DictConfig, dotted: str) -> tuple[str, list[str]]:
    """(parent path, valid keys at that level) for a dotted key that failed to merge."""
    parts = dotted.split(".")
    node: Any = schema
    parent = []
    for p in parts[:-1]:
        if isinstance(node, DictConfig) and p in node:
            node = node[p]
            parent.append(p)
        else:
            break
    keys = list(node.keys()) if isinstance(node, DictConfig) else []
    return ".".join(parent), keys


def _merge(schema: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(schema, layer)
    except (ConfigKeyError, ConfigAttributeError) as e:
        full = getattr(e, "full_key", None) or str(e)
        parent, keys = _valid_keys(schema, full)
        bad = full.split(".")[-1]
        near = difflib.get_close_matches(bad, keys, n=1, cutoff=0.5)
        hint = f"did you mean '{parent + '.' if parent else ''}{near[0]}'? " if near else ""
        raise ConfigError(f"unknown config key '{full}' (from {source}); {hint}"
                          f"valid keys under '{parent or '<root>'}': {', '.join(map(str, keys))}") from None
    except ValidationError as e:
        raise ConfigError(f"invalid value for '{getattr(e, 'full_key', '?')}' (from {source}): {e.msg}") from None


def _split_layer(layer: DictConfig, scale: str) -> tuple[DictConfig, DictConfig | None]:
    """A method/dataset file's body and its `scales.<scale>` section."""
    layer = layer.copy()
    scales = layer.pop("scales", None)
    return layer, (scales.get(scale) if scales is not None else None)


def load_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose the run config from the YAML layers and `key=value` overrides."""
    from datamodules import DATASETS
    from methods import METHODS

    overrides = list(overrides or [])
    default = _load_yaml(CONFIG_DIR / "default.yaml")
    chosen = dict(default.pop("defaults", {}))
    cli = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        if key in SELECTORS:
            chosen[key] = value
        else:
            cli.append(item)
    method, dataset, scale = chosen.get("method"), chosen.get("dataset"), chosen.get("scale", "tiny")
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}")
    if dataset not in _choices("dataset"):
        raise ConfigError(f"unknown dataset {dataset!r}; choose one of: {', '.join(_choices('dataset'))}")
    if scale not in _choices("scale"):
        raise ConfigError(f"unknown scale {scale!r}; choose one of: {', '.join(_choices('scale'))}")

    schema = OmegaConf.structured(RunConfig(method=METHODS[method].Config(), dataset=None))
    ds_layer, ds_scale = _split_layer(_load_yaml(CONFIG_DIR / "dataset" / f"{dataset}.yaml"), scale)
    ds_name = ds_layer.get("dataset", {}).get("name", dataset)
    if ds_name not in DATASETS:
        raise ConfigError(f"configs/dataset/{dataset}.yaml names dataset {ds_name!r}, not registered: {sorted(DATASETS)}")
    schema.dataset = OmegaConf.structured(DATASETS[ds_name].Config())
    schema.method.name = method
    schema.scale = scale

    m_layer, m_scale = _split_layer(_load_yaml(CONFIG_DIR / "method" / f"{method}.yaml"), scale)
    layers = [
        (default, "configs/default.yaml"),
        (ds_layer, f"configs/dataset/{dataset}.yaml"),
        (m_layer, f"configs/method/{method}.yaml"),
        (_load_yaml(CONFIG_DIR / "scale" / f"{scale}.yaml"), f"configs/scale/{scale}.yaml"),
        (ds_scale, f"configs/dataset/{dataset}.yaml scales.{scale}"),
        (m_scale, f"configs/method/{method}.yaml scales.{scale}"),
    ]
    cfg = schema
    for layer, source in layers:
        if layer is not None:
            cfg = _merge(cfg, layer, source)
    try:
        cli_layer = OmegaConf.from_dotlist(cli)
    except Exception as e:  # malformed dotlist entries
        raise ConfigError(f"could not parse command-line overrides {cli}: {e}") from None
    cfg = _merge(cfg, cli_layer, "command line")
    # the evaluation protocol preset fixes every eval key that defines a number; the command line still wins
    # (and the results row then says which of the preset's keys were changed: evaluation.config.protocol_label)
    from evaluation.config import PROTOCOL_DIR, protocol_names

    proto = PROTOCOL_DIR / f"{cfg.eval.protocol}.yaml"
    if not proto.exists():
        near = difflib.get_close_matches(str(cfg.eval.protocol), protocol_names(), n=1, cutoff=0.5)
        raise ConfigError(f"unknown eval.protocol {cfg.eval.protocol!r}; "
                          + (f"did you mean {near[0]!r}? " if near else "") + f"choose one of: {', '.join(protocol_names())}")
    cfg = _merge(cfg, _load_yaml(proto), f"configs/protocol/{proto.name}")
    cfg = _merge(cfg, cli_layer, "command line")
    unknown_stages = set(cfg.stages) - set(METHODS[method].stages)
    if unknown_stages:
        raise ConfigError(f"stages.{sorted(unknown_stages)[0]}: method {method!r} has no such stage; "
                          f"its stages are {list(METHODS[method].stages)}")
    if cfg.trainer.precision == "auto":
        cfg.trainer.precision = resolve_precision(cfg.trainer.accelerator)
    from methods.speed import ALLOCATORS, ATTENTION_KERNELS

    for key, choices in (("attention", ATTENTION_KERNELS), ("allocator", ALLOCATORS)):
        value = cfg.trainer[key]
        if value not in choices:
            near = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
            raise ConfigError(f"unknown trainer.{key} {value!r}; "
                              + (f"did you mean {near[0]!r}? " if near else "") + f"choose one of: {', '.join(choices)}")
    return cfg


def resolve_precision(accelerator: str = "auto") -> str:
    """What trainer.precision=auto means on this machine: bf16-mixed where bf16 is native, else 32-true."""
    import torch

    from benchmarks.machine import fast_bf16

    cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    return "bf16-mixed" if fast_bf16("cuda" if cuda else "cpu") else "32-true"


def merge_overrides(cfg: DictConfig, overrides: DictConfig | list[str], source: str) -> DictConfig:
    """`cfg` with a config layer or `key=value` overrides on top, checked by the same schemas as load_config."""
    if isinstance(overrides, list):
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
        try:
            overrides = OmegaConf.from_dotlist(overrides)
        except Exception as e:  # malformed dotlist entries
            raise ConfigError(f"could not parse overrides {overrides} ({source}): {e}") from None
    cfg = _merge(cfg, overrides, source)
    if cfg.get("trainer") is not None and cfg.trainer.get("precision") == "auto":
        cfg.trainer.precision = resolve_precision(cfg.trainer.accelerator)
    return cfg


def saved_run_config(saved: DictConfig, dataset: str, source: str) -> tuple[DictConfig, dict[str, tuple]]:
    """A run folder's saved config on today's layers, and the `method.*` keys it predates.

    A saved config is complete when written, so a `method.*` key it lacks was added to the code later. Such a
    key takes its schema default, the behaviour before it existed (what every added key keeps at its default:
    `ABSENT_AT_DEFAULT`), not a preset's value, which would build a different model: a tiny CMD run written
    before 2026-12-07 (12) has no `method.autoencoder.loss`, and the tiny preset's PatchGAN since then would ask
    its checkpoint for discriminator weights it never had. Returns (config, {key: (preset value, value used)}).
    """
    from methods import METHODS

    base = load_config([f"method={saved.method.name}", f"dataset={dataset}", f"scale={saved.scale}"])
    schema = OmegaConf.to_container(OmegaConf.structured(METHODS[saved.method.name].Config()))
    held = to_container(saved).get("method", {})
    reset: dict[str, tuple] = {}

    def walk(today: dict, before: dict, default: dict, prefix: str) -> None:
        for key, value in today.items():
            if key not in default or default[key] == "???":  # not in the schema, or no default (a layer must set it)
                continue
            if isinstance(value, dict) and isinstance(default[key], dict):  # a whole section added: its leaves
                walk(value, before.get(key) if isinstance(before.get(key), dict) else {}, default[key], f"{prefix}.{key}")
            elif key not in before and default[key] != value:
                reset[f"{prefix}.{key}"] = (value, default[key])

    walk(to_container(base.method), held, schema, "method")
    for key, (_, used) in reset.items():
        OmegaConf.update(base, key, used, merge=False)
    return merge_overrides(base, saved, source), reset


def predates_note(source: str, reset: dict[str, tuple]) -> str:
    """One line on the keys a saved config predates (`reset` as `saved_run_config` returns it)."""
    shown = ", ".join(f"{k}={used!r} (preset: {today!r})" for k, (today, used) in reset.items())
    return f"note: {source} predates {len(reset)} method key(s); they take their values from before they existed: {shown}"


def to_container(cfg: DictConfig) -> dict:
    """Plain dicts and lists (what checkpoints and the results store keep)."""
    return OmegaConf.to_container(cfg, resolve=True)


def without_keys(d: dict, dotted: tuple[str, ...]) -> dict:
    """A copy of nested dict `d` without the given dotted keys."""
    out = dict(d)
    for key in dotted:
        head, _, rest = key.partition(".")
        if rest and isinstance(out.get(head), dict):
            out[head] = without_keys(out[head], (rest,))
        elif not rest:
            out.pop(head, None)
    return out


def config_hash(cfg: DictConfig | dict, exclude: tuple[str, ...] = HOW_KEYS) -> str:
    """sha256 of the config that determines a result (paths, labels and progress settings left out)."""
    d = cfg if isinstance(cfg, dict) else to_container(cfg)
    unset = tuple(k for k, default in ABSENT_AT_DEFAULT.items() if _dotted(d, k) == default)
    d = without_keys(d, exclude + unset)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def _dotted(d: dict, key: str):
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def stage_settings(cfg: DictConfig, stage: str) -> dict:
    """The effective training settings of one stage: run-wide values with its overrides."""
    over = cfg.stages.get(stage) if stage in cfg.stages else None
    pick = lambda name, default: getattr(over, name) if over is not None and getattr(over, name) is not None else default  # noqa: E731
    return {
        "max_steps": pick("max_steps", cfg.trainer.max_steps),
        "lr": pick("lr", cfg.optim.lr),
        "batch_size": pick("batch_size", cfg.data.batch_size),
        "ema_decay": pick("ema_decay", cfg.optim.ema_decay),
        "betas": list(pick("betas", cfg.optim.betas)),
    }
