"""A Stable Diffusion folder, read locally, and its UNet conditioned the way Stable Diffusion conditions it.

The folder is what diffusers' `save_pretrained` writes (a Stable Diffusion snapshot has every part):

    <folder>/unet/          UNet2DConditionModel          the denoiser (loaded by `methods.image_prior.load_diffusers`)
    <folder>/vae/           AutoencoderKL                 the latent space (optional)
    <folder>/text_encoder/  transformers CLIPTextModel    prompt tokens -> encoder_hidden_states (optional)
    <folder>/tokenizer/     CLIPTokenizer                 vocab.json, merges.txt (optional, with text_encoder/)
    <folder>/scheduler/     scheduler_config.json         beta schedule and prediction type (optional)

Nothing is downloaded: every part is read from the folder or not used.

`PromptDenoiser` is eps_theta(x_t, t, c) = unet(x_t, t, encoder_hidden_states=CLIP(prompt(c))), as
Stable Diffusion's pipeline computes it: the prompt is padded to the tokenizer's length, encoded by
the frozen text encoder, and its last hidden state (B, L, D) is the UNet's cross-attention context.
A caption is its own prompt; a class label becomes one through a template ("a video of {class}").
The null condition of classifier-free guidance is the empty prompt's embedding, as in Stable
Diffusion (training drops a row's prompt to "" with the configured probability).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from methods import diffusion as D
from methods.base import Conditioning

PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}  # diffusers' name -> our objective


# --- the scheduler config ---------------------------------------------------------------------


@dataclass
class FolderSchedule:
    """The noise schedule and prediction type a folder's UNet was trained with (its scheduler_config.json)."""

    alpha_bar: Tensor  # (T,) float64
    objective: str  # eps | v | x0
    source: dict  # the keys read, as written in the file

    @property
    def num_timesteps(self) -> int:
        return len(self.alpha_bar)


def read_schedule(folder: str | Path) -> FolderSchedule | None:
    """`<folder>/scheduler/scheduler_config.json` as (alpha_bar, objective); None when the folder has none."""
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    conf = json.loads(path.read_text())
    T = int(conf.get("num_train_timesteps", 1000))
    name = conf.get("beta_schedule", "linear")
    start, end = float(conf.get("beta_start", 0.0001)), float(conf.get("beta_end", 0.02))
    if conf.get("trained_betas") is not None:
        betas = torch.tensor(conf["trained_betas"], dtype=torch.float64)
        T = len(betas)
    elif name == "scaled_linear":  # Stable Diffusion 1.x / 2.x: 0.00085 .. 0.012
        betas = D.scaled_linear_betas(start, end, T)
    elif name == "linear":
        betas = torch.linspace(start, end, T, dtype=torch.float64)
    elif name == "squaredcos_cap_v2":  # Nichol & Dhariwal's cosine, capped at 0.999: our "cosine"
        betas = D.beta_schedule("cosine", T)
    else:
        raise ValueError(f"{path}: beta_schedule {name!r} is not supported; supported: scaled_linear, linear, "
                         "squaredcos_cap_v2 (or trained_betas); set method.image_prior.scheduler=config to use "
                         "method.image_prior.diffusion instead")
    if conf.get("rescale_betas_zero_snr"):
        raise ValueError(f"{path}: rescale_betas_zero_snr=true is not supported; set method.image_prior.scheduler=config")
    prediction = conf.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"{path}: prediction_type {prediction!r} is not one of {sorted(PREDICTION_TYPES)}")
    keys = ("_class_name", "beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "prediction_type",
            "timestep_spacing", "steps_offset")
    return FolderSchedule(torch.cumprod(1 - betas, dim=0), PREDICTION_TYPES[prediction],
                          {k: conf[k] for k in keys if k in conf})


# --- prompts ----------------------------------------------------------------------------------


def has_prompt_encoder(folder: str | Path) -> bool:
    """Whether the folder holds a text encoder and its tokenizer."""
    return (Path(folder) / "text_encoder").is_dir() and (Path(folder) / "tokenizer").is_dir()


def class_phrase(name: str) -> str:
    """A class name in words: 'ApplyEyeMakeup' -> 'apply eye makeup', 'playing_guitar' -> 'playing guitar'."""
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name)
    return re.sub(r"[\s_\-]+", " ", name).strip().lower()


class PromptEncoder(nn.Module):
    """A folder's frozen CLIP text encoder and tokenizer: prompts -> encoder_hidden_states (B, L, D)."""

    frozen_weights = True  # never trained (methods.nets.embed.trainable leaves it out of every stage)

    def __init__(self, folder: str | Path) -> None:
        super().__init__()
        root = Path(folder)
        if not has_prompt_encoder(root):
            raise FileNotFoundError(
                f"{str(root)!r} has no text_encoder/ and tokenizer/ (config key method.image_prior.diffusers_path, "
                "with method.image_prior.prompt_encoder=folder): give a Stable Diffusion folder with both, or set "
                "method.image_prior.prompt_encoder=learned")
        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError as e:
            raise ImportError("a Stable Diffusion folder's text encoder needs transformers: pip install -e '.[clip]'") from e
        self.tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
        self.model = CLIPTextModel.from_pretrained(root / "text_encoder").eval().requires_grad_(False)
        self.out_dim = self.model.config.hidden_size
        self.max_length = min(self.tokenizer.model_max_length, self.model.config.max_position_embeddings)

    def train(self, mode: bool = True) -> PromptEncoder:
        return super().train(False)  # frozen: no dropout, whatever the surrounding module does

    def tokenize(self, prompts: list[str]) -> Tensor:
        """(B, max_length) token ids, padded and truncated as Stable Diffusion's pipeline does."""
        return self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                              return_tensors="pt").input_ids

    def forward(self, prompts: list[str]) -> Tensor:
        device = next(self.model.parameters()).device
        with torch.no_grad():
            return self.model(self.tokenize(prompts).to(device))[0]  # last_hidden_state (B, L, D)


class PromptDenoiser(nn.Module):
    """eps_theta(x_t, t, c) = unet(x_t, t, encoder_hidden_states=CLIP(prompt(c))): Stable Diffusion's conditioning.

    Same calls as `methods.nets.cond_denoiser.CondDenoiser` (forward with cond/drop, random_drop, guided).
    conditioning: none (every prompt empty), class (label -> `class_prompt` with {class} filled in) or text
    (the captions).
    """

    def __init__(self, unet: nn.Module, prompts: PromptEncoder, conditioning: str, class_names: tuple[str, ...],
                 class_prompt: str) -> None:
        super().__init__()
        if conditioning not in ("none", "class", "text"):
            raise ValueError(f"method.image_prior.conditioning={conditioning!r}: with a Stable Diffusion text encoder "
                             "choose none, class (prompts from method.image_prior.class_prompt) or text (captions)")
        if conditioning == "class" and "{class}" not in class_prompt:
            raise ValueError(f"method.image_prior.class_prompt={class_prompt!r} must contain {{class}}")
        width = unet.config.cross_attention_dim
        if prompts.out_dim != width:
            raise ValueError(f"the text encoder's width {prompts.out_dim} is not the UNet's cross_attention_dim {width}")
        self.backbone = unet
        self.prompts = prompts
        self.conditioning = conditioning
        self.class_names = tuple(class_names)
        self.class_prompt = class_prompt

    @property
    def enabled(self) -> bool:
        return self.conditioning != "none"

    def prompt_texts(self, n: int, cond: Conditioning | None, drop: Tensor | None = None) -> list[str]:
        """The n prompts of a batch; rows with `drop` set (and every row of an unconditional model) are ""."""
        cond = cond or Conditioning()
        if self.conditioning == "class" and cond.label is not None:
            if not self.class_names:
                raise ValueError("class-conditioning a Stable Diffusion prior turns labels into prompts and needs the "
                                 "dataset's class names (DataSpec.class_names is empty)")
            texts = [self.class_prompt.replace("{class}", class_phrase(self.class_names[int(i)])) for i in cond.label]
        elif self.conditioning == "text" and cond.text is not None:
            texts = list(cond.text)
        else:
            texts = [""] * n
        if drop is not None:
            texts = ["" if d else p for p, d in zip(texts, drop.tolist())]
        return texts

    def context(self, n: int, cond: Conditioning | None, drop: Tensor | None = None) -> Tensor:
        """encoder_hidden_states (n, L, D) for a batch."""
        return self.prompts(self.prompt_texts(n, cond, drop))

    def predict(self, x_t: Tensor, t: Tensor, context: Tensor) -> Tensor:
        """The UNet's output for x_t (B, C, H, W), t (B,) and encoder_hidden_states (B, L, D)."""
        return self.backbone(x_t, t, encoder_hidden_states=context.to(x_t.dtype)).sample

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning | None = None, drop: Tensor | None = None) -> Tensor:
        return self.predict(x_t, t, self.context(x_t.shape[0], cond, drop))

    def random_drop(self, n: int, p: float, device: torch.device) -> Tensor | None:
        """(n,) bool: rows trained with the empty prompt (CFG training)."""
        if not self.enabled or p <= 0:
            return None
        return torch.rand(n, device=device) < p

    def guided(self, cond: Conditioning | None, guidance: float):
        """model(x_t, t) -> eps with CFG scale s against the empty prompt, as one doubled batch.

        The prompts are encoded once here, not at every sampler step. s = 1 (or an unconditional
        model) runs the conditional branch alone.
        """
        cache: dict[int, tuple[Tensor, Tensor | None]] = {}  # batch size -> (prompt context, empty-prompt context)

        def contexts(batch: int) -> tuple[Tensor, Tensor | None]:
            if batch not in cache:
                uncond = guidance == D.NO_GUIDANCE or not self.enabled
                cache[batch] = (self.context(batch, cond), None if uncond else self.context(batch, None))
            return cache[batch]

        def model(x_t: Tensor, t: Tensor) -> Tensor:
            ctx_c, ctx_u = contexts(x_t.shape[0])
            if ctx_u is None:
                return self.predict(x_t, t, ctx_c)
            out = self.predict(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([ctx_c, ctx_u]))
            eps_c, eps_u = out.chunk(2)
            return D.cfg_combine(eps_c, eps_u, guidance)

        return model
