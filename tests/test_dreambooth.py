"""`lily recipe dreambooth-sdxl`: the paper's settings, and tiny random SD-1.5-style and SDXL-style pipelines built
from configs and saved as pipeline folders, trained end to end on CPU and loaded back for generation."""

import json
import random
import string
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import lily
from lily.cli import main
from lily.diffusion import UNET_TARGETS, DiffusionError, encode_prompt, load_into_pipeline, load_pipeline
from lily.errors import ConfigError, DataError
from lily.recipes import dreambooth, names

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

RESOLUTION = ["--resolution", "16"]


def tiny_pipeline(directory, sdxl: bool) -> str:
    """A Stable Diffusion (or SDXL) pipeline of tiny random parts: a character-level CLIP tokenizer, CLIP text
    encoder(s), a 2-block VAE (latents at 1/2 size) and a UNet with 6 transformer blocks (enough for 4 A groups)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + "_":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=24)
    text = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, max_position_embeddings=24, bos_token_id=0,
                                       eos_token_id=1, pad_token_id=1, projection_dim=16)  # fmt: skip
    torch.manual_seed(0)
    added = {"addition_embed_type": "text_time", "addition_time_embed_dim": 4,
             "projection_class_embeddings_input_dim": 6 * 4 + 16} if sdxl else {}  # fmt: skip
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=2, sample_size=8, norm_num_groups=4, attention_head_dim=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32 if sdxl else 16, **added,
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                                  up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4,
                                  sample_size=16)  # fmt: skip
    parts = {"vae": vae, "unet": unet, "tokenizer": tokenizer, "text_encoder": transformers.CLIPTextModel(text)}
    schedule = {"num_train_timesteps": 100, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                "beta_end": 0.012, "steps_offset": 1}  # fmt: skip
    if sdxl:
        pipe = diffusers.StableDiffusionXLPipeline(
            **parts, text_encoder_2=transformers.CLIPTextModelWithProjection(text), tokenizer_2=tokenizer,
            scheduler=diffusers.EulerDiscreteScheduler(**schedule, timestep_spacing="leading"),
        )  # fmt: skip
    else:
        pipe = diffusers.StableDiffusionPipeline(
            **parts, scheduler=diffusers.DDPMScheduler(**schedule, clip_sample=False), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    pipe.save_pretrained(directory)
    return str(directory)


def image_folder(directory, count: int, size: tuple[int, int]) -> str:
    from PIL import Image

    directory.mkdir(parents=True)
    rng = np.random.default_rng(count)
    for i in range(count):
        Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(directory / f"{i}.png")
    return str(directory)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"), sdxl=False)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("tiny-sdxl"), sdxl=True)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three photos of the subject 'teddy' (the folder name, as in the DreamBooth dataset) and three class images."""
    root = tmp_path_factory.mktemp("dreambooth")
    return image_folder(root / "teddy", 3, (20, 24)), image_folder(root / "bears", 3, (24, 18))


def unet_output(pipe, seed: int = 0) -> torch.Tensor:
    """The UNet's noise prediction for a fixed noisy latent, prompt and (SDXL) time ids."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    embeds, pooled = encode_prompt(pipe, "a photo of teddy", "cpu")
    added = None if pooled is None else {"text_embeds": pooled.repeat(2, 1),
                                         "time_ids": torch.tensor([[20.0, 24, 2, 0, 16, 16]] * 2)}  # fmt: skip
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([10, 90]), encoder_hidden_states=embeds.repeat(2, 1, 1),
                         added_cond_kwargs=added).sample  # fmt: skip


def test_defaults_are_the_papers():
    assert "dreambooth-sdxl" in names()
    cfg = dreambooth.DreamBoothConfig()
    assert (cfg.model, cfg.vae) == ("stabilityai/stable-diffusion-xl-base-1.0", "auto")
    assert cfg.targets == ["to_k", "to_q", "to_v", "to_out.0"] and (cfg.r, cfg.num_A, cfg.num_B, cfg.scaling) == (
        4, 4, 4, 1.0)  # fmt: skip
    assert (cfg.lr, cfg.weight_decay, cfg.max_grad_norm, cfg.max_steps, cfg.batch_size, cfg.grad_accum) == (
        1e-4, 1e-4, 1.0, 500, 1, 4)  # fmt: skip
    assert (cfg.mixed_precision, cfg.resolution, cfg.seed, cfg.instance_prompt) == (
        "fp16", 1024, 0, "a photo of {subject}")  # fmt: skip
    parsed = vars(dreambooth.build_parser().parse_args(["--data", "x", "--num-A", "2", "--targets", "to_q"]))
    assert parsed == {**dreambooth.RECIPES["dreambooth-sdxl"], "data": "x", "num_A": 2, "targets": ["to_q"]}
    with pytest.raises(SystemExit) as exit_info:
        main(["recipe", "dreambooth-sdxl", "--help"])
    assert exit_info.value.code == 0


def test_images_are_cropped_with_sdxl_time_ids(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((20, 30, 3), 255, dtype=np.uint8)).save(tmp_path / "wide.png")  # height 20, width 30
    centre = dreambooth.prepare_image(tmp_path / "wide.png", 16, center_crop=True, rng=random.Random(0))
    assert centre.pixels.shape == (3, 16, 16) and torch.equal(centre.pixels, torch.ones(3, 16, 16))
    assert centre.time_ids == [20, 30, 0, 4, 16, 16]  # resized to 16 x 24: original size, crop corner, target size
    crops = {tuple(dreambooth.prepare_image(tmp_path / "wide.png", 16, False, random.Random(s)).time_ids[2:4])
             for s in range(20)}  # fmt: skip
    assert {top for top, _ in crops} == {0} and {left for _, left in crops} <= set(range(9)) and len(crops) > 1


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_is_the_noise_prediction_mse_plus_the_weighted_prior_loss(prediction_type):
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    latents = torch.randn(4, 4, 2, 2)
    prediction = torch.randn(4, 4, 2, 2)
    unet = lambda *args, **kwargs: SimpleNamespace(sample=prediction)  # noqa: E731
    is_class = torch.tensor([False, False, True, True])
    torch.manual_seed(0)
    loss = dreambooth.denoising_loss(unet, scheduler, latents, None, None, is_class, prior_loss_weight=0.5)
    torch.manual_seed(0)
    noise, timesteps = torch.randn_like(latents), torch.randint(0, 100, (4,))
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    mse = torch.nn.functional.mse_loss
    expected = mse(prediction[:2], target[:2]) + 0.5 * mse(prediction[2:], target[2:])
    assert loss.item() == pytest.approx(expected.item())
    torch.manual_seed(0)
    no_prior = dreambooth.denoising_loss(unet, scheduler, latents, None, None, torch.zeros(4, dtype=torch.bool), 0.5)
    assert no_prior.item() == pytest.approx(mse(prediction, target).item())


def test_sd_recipe_trains_with_prior_preservation_and_loads_for_generation(sd_dir, photos, tmp_path):
    subject, classes = photos
    out = tmp_path / "run"
    argv = ["recipe", "dreambooth-sdxl", "--model", sd_dir, "--data", subject, "--output-dir", str(out), *RESOLUTION,
            "--max-steps", "2", "--grad-accum", "2", "--class-data", classes, "--class-prompt", "a photo of a bear",
            "--prior-loss-weight", "0.5"]  # fmt: skip
    assert main(argv) == 0
    run = json.loads((out / "run.json").read_text())
    assert (run["subject"], run["instance_prompt"], run["vae"], run["mixed_precision"]) == (
        "teddy", "a photo of teddy", None, "no")  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["loss"]) == 2 and (metrics["instance_images"], metrics["class_images"]) == (3, 3)
    saved = lily.LilyConfig.from_pretrained(out / "adapter")
    assert (saved.target_modules, saved.r, saved.num_A, saved.routing) == (UNET_TARGETS, 4, 4, "sample")
    assert metrics["adapter_parameters"] == 4 * (4 * 16 * 4 + 4 * 4 * 16 + 12 * 4 * 4)  # 4 types of 12 layers, 16->16

    pipe = load_pipeline(sd_dir)
    base = unet_output(pipe)
    load_into_pipeline(pipe, out / "adapter")
    assert not torch.equal(unet_output(pipe), base)  # the trained experts moved away from zero
    assert not any(p.requires_grad for p in pipe.unet.parameters())  # loaded frozen, for inference

    assert main(argv) == 2  # a finished run is not overwritten without --overwrite
    assert dreambooth.main(["generate", str(out), "--prompt", "a photo of {subject} on a beach", "--steps", "1"]) == 0
    assert (out / "samples" / "00-000.png").is_file()


def test_sdxl_recipe_passes_pooled_text_and_time_ids_and_merges_with_static_routing(sdxl_dir, photos, tmp_path):
    out = tmp_path / "run"
    cfg = dreambooth.DreamBoothConfig(model=sdxl_dir, data=photos[0], output_dir=str(out), resolution=16, max_steps=2,
                                      grad_accum=1, routing="static", lr=1e-2)  # fmt: skip
    metrics = dreambooth.train(cfg, log=lambda _: None)
    assert json.loads((out / "run.json").read_text())["sdxl"] and len(metrics["loss"]) == 2
    pipe = load_pipeline(sdxl_dir)
    assert pipe.unet.config.addition_embed_type == "text_time"  # this UNet fails without the added conditions
    base = unet_output(pipe)
    load_into_pipeline(pipe, out / "adapter")
    adapted = unet_output(pipe)
    assert not torch.allclose(adapted, base)
    merged = load_into_pipeline(load_pipeline(sdxl_dir), out / "adapter", merge=True)
    assert not hasattr(merged.unet, "lily_adapters")  # folded into the weights, the adapter taken off
    torch.testing.assert_close(unet_output(merged), adapted, rtol=1e-4, atol=1e-5)


def test_merge_needs_input_independent_routing(sd_dir, photos, tmp_path):
    cfg = dreambooth.DreamBoothConfig(model=sd_dir, data=photos[0], output_dir=str(tmp_path), resolution=16,
                                      max_steps=1, grad_accum=1)  # fmt: skip
    dreambooth.train(cfg, log=lambda _: None)
    pipe = load_pipeline(sd_dir)
    base = unet_output(pipe)
    with pytest.raises(lily.MergeError, match="routing='sample'"):
        load_into_pipeline(pipe, tmp_path / "adapter", merge=True)
    assert not hasattr(pipe.unet, "lily_adapters") and torch.equal(unet_output(pipe), base)  # left as it was


def test_bad_input_is_one_line_naming_the_flag(sd_dir, photos, tmp_path, capsys):
    def error(**kw) -> str:
        cfg = dreambooth.DreamBoothConfig(**{"model": sd_dir, "data": photos[0], "output_dir": str(tmp_path), **kw})
        with pytest.raises((DataError, ConfigError, DiffusionError)) as info:
            dreambooth.train(cfg, log=lambda _: None)
        return str(info.value)

    assert "--data is required" in error(data=None)
    assert "--data " in error(data=str(tmp_path / "missing")) and "not a folder" in error(data=str(tmp_path / "x"))
    (tmp_path / "empty").mkdir()
    assert "holds no images" in error(data=str(tmp_path / "empty"))
    assert "--class-prompt" in error(class_data=photos[1])
    assert "--max-steps must be at least 1" in error(max_steps=0)
    assert "not a diffusers pipeline" in error(model=str(tmp_path))
    assert main(["recipe", "dreambooth-sdxl", "--model", str(tmp_path), "--data", photos[0]]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("lily recipe dreambooth-sdxl: error: ") and "not a diffusers pipeline" in last
    assert dreambooth.main(["generate", "--model", sd_dir, "--prompt", "a {subject}", "--output-dir", "x"]) == 2
    assert "only a run directory defines" in capsys.readouterr().err


def test_missing_diffusers_names_the_extra(monkeypatch, photos):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(DiffusionError, match=r"pip install lily-adapters\[diffusion\]"):
        load_pipeline("anything")
    assert main(["recipe", "dreambooth-sdxl", "--data", photos[0]]) == 2
