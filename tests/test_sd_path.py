"""Stable Diffusion as the image prior, for real: a tiny, randomly initialised SD-structured folder.

The folder holds every part of a Stable Diffusion snapshot (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
`scheduler/`), written with `save_pretrained` from tiny configs (the tokenizer's vocab.json and merges.txt
are written here). Everything is read from disk and nothing may touch the network: every test runs with
socket connections refused.

What is checked: the schedule and prediction type come from `scheduler/scheduler_config.json`, not from the
config; CMD's content model in latent mode gives exactly the loaded UNet's prediction for the same latents,
timestep and encoder_hidden_states of the loaded CLIP text encoder (captions, class prompts, the empty prompt
as the CFG null); the text encoder and VAE stay frozen through every stage; VideoFusion's base generator is
the same UNet through the same path; both methods run end to end through `benchmarks.run`.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from methods import diffusion as D
from methods.base import Conditioning, DataSpec
from methods.image_prior import ImagePrior, ImagePriorConfig
from methods.nets.sd import PromptDenoiser, class_phrase

CLASSES = ("ApplyEyeMakeup", "left", "playing_guitar")
DATA = DataSpec(channels=3, frames=4, height=16, width=16, num_classes=3, captions=True, class_names=CLASSES)
MAX_TOKENS = 16  # the tiny tokenizer's model_max_length (77 in Stable Diffusion)
WORDS = ("a", "video", "of", "apply", "eye", "makeup", "left", "right", "up", "down", "grow", "shrink", "orbit",
         "bounce", "playing", "guitar", "red", "blue", "circle", "square", "moving")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to reach the network fails the test: the folder must be all that is read."""
    original = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access attempted: {address}")
        return original(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


def write_tokenizer(folder: Path) -> None:
    """A CLIP byte-level BPE tokenizer over WORDS: vocab.json and merges.txt written by hand, then saved."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges: list[str] = []
    for ch in sorted(set("".join(WORDS))):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    for word in WORDS:  # merge left to right: a, v+i, vi+d, ... until the word is one token
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pair = f"{parts[0]} {parts[1]}"
            if pair not in merges:
                merges.append(pair)
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS)
    tok.save_pretrained(folder)


def build_tiny_sd(root: Path, prediction_type: str = "epsilon") -> Path:
    """unet/, vae/, text_encoder/, tokenizer/, scheduler/ as a Stable Diffusion snapshot lays them out, tiny and random."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    write_tokenizer(root / "tokenizer")
    vocab_size = len(json.loads((root / "tokenizer" / "vocab.json").read_text()))
    CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).save_pretrained(root / "text_encoder")
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).save_pretrained(root / "unet")
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
    ).save_pretrained(root / "vae")
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
                  ).save_pretrained(root / "scheduler")
    return root


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


def reference(sd: Path):
    """The folder's parts loaded on their own, as a diffusers pipeline would: (unet, text encoder, tokenizer)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return (UNet2DConditionModel.from_pretrained(sd / "unet").eval(), CLIPTextModel.from_pretrained(sd / "text_encoder").eval(),
            CLIPTokenizer.from_pretrained(sd / "tokenizer"))


def encode_prompts(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Stable Diffusion's prompt encoding: pad to the tokenizer's length, last hidden state of the text encoder."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def latent_cmd(sd: Path, conditioning: str = "class", **content):
    from methods.cmd import CMD, AutoencoderConfig, CMDConfig, CMDSamplingConfig, ContentConfig, MotionConfig
    from methods.nets.transformer import DiTConfig

    cfg = CMDConfig(space="latent", autoencoder=AutoencoderConfig(width=32, depth=1, heads=2, patch=2, motion_dim=4),
                    image_prior=ImagePriorConfig(diffusers_path=str(sd), conditioning=conditioning),
                    content=ContentConfig(**content),
                    motion=MotionConfig(dit=DiTConfig(width=32, depth=1, heads=2), patch=2, content_patch=2),
                    sampling=CMDSamplingConfig(content_steps=2, motion_steps=2))
    return CMD(cfg, DATA)


# --- the folder's schedule and prediction type ------------------------------------------------------


def test_schedule_and_prediction_type_come_from_the_folder(sd):
    from diffusers import DDIMScheduler

    # the config says v + cosine (CMD's tiny preset): the folder's scaled_linear + epsilon win
    cfg = ImagePriorConfig(diffusers_path=str(sd))
    cfg.diffusion.objective, cfg.diffusion.schedule = "v", "cosine"
    prior = ImagePrior(cfg, DATA)
    assert prior.objective == "eps" and prior.schedule["beta_schedule"] == "scaled_linear"
    theirs = DDIMScheduler.from_pretrained(sd / "scheduler").alphas_cumprod  # float32 in diffusers
    assert torch.allclose(prior.alpha_bar.float(), theirs, rtol=0, atol=1e-6)
    assert torch.equal(prior.alpha_bar, D.alpha_bar_schedule("scaled_linear", 1000))  # SD's 0.00085 .. 0.012
    assert D.beta_schedule("scaled_linear")[[0, -1]].tolist() == pytest.approx([0.00085, 0.012])
    # scheduler=config: the config's own schedule, whatever the folder says
    cfg.scheduler = "config"
    own = ImagePrior(cfg, DATA)
    assert own.objective == "v" and torch.equal(own.alpha_bar, D.alpha_bar_schedule("cosine", 1000))


def test_v_prediction_folder(tmp_path):
    from methods.videofusion import VideoFusion, VideoFusionConfig

    root = build_tiny_sd(tmp_path / "sd_v", prediction_type="v_prediction")
    assert ImagePrior(ImagePriorConfig(diffusers_path=str(root)), DATA).objective == "v"
    vf = VideoFusion(VideoFusionConfig(image_prior=ImagePriorConfig(diffusers_path=str(root))), DATA)
    assert vf.objective == "v"  # both generators then predict v, converted exactly to the decomposed noise


# --- SD's text conditioning, with the weights as loaded ---------------------------------------------------


def test_class_names_become_words():
    assert class_phrase("ApplyEyeMakeup") == "apply eye makeup" and class_phrase("playing_guitar") == "playing guitar"
    assert class_phrase("left") == "left"


LABELS = torch.tensor([0, 1, 2])
PROMPTS = ["a video of apply eye makeup", "a video of left", "a video of playing guitar"]  # "a video of {class}"
CAPTIONS = ["red circle moving left", "blue square", ""]


@pytest.mark.parametrize("conditioning", ["class", "text"])
def test_cmd_content_model_reproduces_the_loaded_unet(sd, conditioning):
    """Same latents, timestep and encoder_hidden_states from the loaded text encoder -> the same prediction, bit for bit."""
    cmd = latent_cmd(sd, conditioning)
    den = cmd.content.denoiser
    assert isinstance(den, PromptDenoiser)
    cond, texts = ((Conditioning(label=LABELS), PROMPTS) if conditioning == "class" else
                   (Conditioning(text=CAPTIONS), CAPTIONS))
    assert den.prompt_texts(3, cond) == texts
    assert den.prompt_texts(3, cond, drop=torch.tensor([False, True, False])) == [texts[0], "", texts[2]]
    unet, text_encoder, tokenizer = reference(sd)
    torch.manual_seed(1)
    x_t, t = torch.randn(3, 4, 8, 8), torch.tensor([999, 500, 3])
    with torch.no_grad():
        ehs = encode_prompts(text_encoder, tokenizer, texts)
        expected = unet(x_t, t, encoder_hidden_states=ehs).sample
        null = unet(x_t, t, encoder_hidden_states=encode_prompts(text_encoder, tokenizer, [""] * 3)).sample
        assert (expected[:2] - null[:2]).abs().amin(dim=(1, 2, 3)).gt(0).all()  # the prompts reach the prediction
        for when in ("as built", "after the content stage copied the image prior in"):
            if when != "as built":
                cmd.on_stage_start("content")
            ours = cmd.content.denoiser(x_t, t, cond)
            diff = (ours - expected).abs().max().item()
            assert torch.equal(ours, expected), f"{when}: max |difference| {diff:.3g}"
            # a dropped row is the empty prompt; CFG guides against the empty prompt's embedding, as SD does
            dropped = cmd.content.denoiser(x_t, t, cond, torch.tensor([True, False, True]))
            assert torch.equal(dropped[[0, 2]], null[[0, 2]]) and torch.equal(dropped[1], expected[1])
            guided = den.guided(cond, 4.0)(x_t, t)  # one doubled batch
            torch.testing.assert_close(guided, null + 4.0 * (expected - null), rtol=0, atol=1e-5)


def test_text_encoder_and_vae_stay_frozen_through_every_stage(sd):
    from datamodules.batch import VideoBatch

    cmd = latent_cmd(sd)
    frozen = {n: p.clone() for n, p in cmd.named_parameters() if ".prompts." in n or ".vae." in n}
    assert frozen and any(".prompts.model." in n for n in frozen)
    for p in cmd.parameters():
        p.requires_grad_(True)  # what benchmarks.run does between stages
    video = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    batch = VideoBatch(video, torch.tensor([0, 2]), text=["a video of left", "blue square"])
    for stage in cmd.stages:
        params = cmd.stage_parameters(stage)
        assert not {id(p) for p in params} & {id(p) for n, p in cmd.named_parameters() if n in frozen}, stage
        cmd.on_stage_start(stage)
        opt = torch.optim.SGD(params, lr=0.1)
        loss = cmd.loss(stage, batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in cmd.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    video_out = cmd.sample(2, Conditioning(label=torch.tensor([0, 1])), steps=2, guidance=3.0)
    assert video_out.shape == (2, *DATA.video_shape) and video_out.abs().max() <= 1


def test_learned_token_is_still_available_as_an_ablation(sd):
    prior = ImagePrior(ImagePriorConfig(diffusers_path=str(sd), prompt_encoder="learned"), DATA)
    assert not isinstance(prior.denoiser, PromptDenoiser) and prior.objective == "eps"  # the folder's schedule still
    with pytest.raises(ValueError, match="class_prompt"):
        ImagePrior(ImagePriorConfig(diffusers_path=str(sd), class_prompt="a video"), DATA)
    with pytest.raises(ValueError, match="prompt_encoder"):
        ImagePrior(ImagePriorConfig(diffusers_path=str(sd), prompt_encoder="clip"), DATA)


def test_videofusion_base_generator_is_the_loaded_unet(sd):
    from methods.videofusion import VideoFusion, VideoFusionConfig

    vf = VideoFusion(VideoFusionConfig(image_prior=ImagePriorConfig(diffusers_path=str(sd))), DATA)
    assert isinstance(vf.base.denoiser, PromptDenoiser) and vf.base.objective == "eps"
    unet, text_encoder, tokenizer = reference(sd)
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    ehs = encode_prompts(text_encoder, tokenizer, ["a video of left", "a video of apply eye makeup"])
    with torch.no_grad():
        assert torch.equal(vf.base.denoiser(x_t, t, Conditioning(label=torch.tensor([1, 0]))),
                           unet(x_t, t, encoder_hidden_states=ehs).sample)
    assert vf.residual.backbone.stem.in_channels == 4  # the residual generator works on the VAE's latents too


# --- end to end through benchmarks.run ----------------------------------------------------------


@pytest.mark.parametrize("method", ["cmd", "videofusion"])
def test_run_end_to_end_on_the_folder(sd, tmp_path, method):
    from benchmarks import run
    from benchmarks.results import read_rows

    extra = ["method.space=latent"] if method == "cmd" else []
    row = run.main(["scale=test", f"method={method}", *extra, f"method.image_prior.diffusers_path={sd}",
                    f"runs_root={tmp_path / 'runs'}", f"results={tmp_path / 'results.jsonl'}",
                    f"cache_dir={tmp_path / 'cache'}"])
    run_dir = Path(row["run_dir"])
    assert len(list((run_dir / "samples").glob("*.mp4"))) == 2
    stages = ("image_prior", "autoencoder", "content", "motion") if method == "cmd" else ("image_prior", "video")
    for stage in stages:
        assert (run_dir / "checkpoints" / stage / "final.pt").exists(), stage
    rows = read_rows(tmp_path / "results.jsonl")
    assert len(rows) == 1 and rows[0]["method"] == method
    # the trained model conditioned its UNet through the folder's text encoder, which came out of training unchanged
    from transformers import CLIPTextModel

    state = torch.load(run_dir / "checkpoints" / stages[-1] / "final.pt", map_location="cpu", weights_only=True)
    model = "content" if method == "cmd" else "base"
    loaded = CLIPTextModel.from_pretrained(sd / "text_encoder").state_dict()
    prefix = f"{model}.denoiser.prompts.model."
    assert {k[len(prefix):] for k in state if k.startswith(prefix)} == set(loaded)
    # not trained (a training step moves weights by ~lr); not bit-equal either: the EMA callback's
    # `averaged * d + current * (1 - d)` rounds a constant weight by about an ulp per update (measured 3e-8 here)
    for k, v in loaded.items():
        torch.testing.assert_close(state[prefix + k], v, rtol=0, atol=1e-6, msg=k)
