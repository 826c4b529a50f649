"""Lily on diffusers pipelines: load a Stable Diffusion (1.x/2.x) or SDXL pipeline, encode prompts as the pipeline
does, and put a Lily adapter trained on its UNet into a pipeline for generation.

diffusers is an optional extra (`pip install lily-adapters[diffusion]`); it is imported only when called.

    import diffusers, torch, lily.diffusion
    pipe = diffusers.DiffusionPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0",
                                                       torch_dtype=torch.float16).to("cuda")
    lily.diffusion.load_into_pipeline(pipe, "out/bear_plushie/adapter")
    pipe("a photo of bear_plushie in the jungle").images[0].save("jungle.png")
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import torch

from lily.errors import LilyError, MergeError

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
"""The UNet's attention projections (self- and cross-attention), the paper's SDXL targets."""

FP16_VAE = "madebyollin/sdxl-vae-fp16-fix"
"""The SDXL VAE fine-tuned not to overflow in float16, which the paper trains with."""


class DiffusionError(LilyError, ValueError):
    """diffusers is missing, or a model is not a pipeline lily can adapt."""


def require_diffusers() -> ModuleType:
    """The diffusers module, or a DiffusionError that says how to install it."""
    try:
        import diffusers
    except ImportError as exc:
        raise DiffusionError(f"diffusion models need diffusers: pip install lily-adapters[diffusion] ({exc}).") from exc
    return diffusers


def pipeline_class(model: str) -> str:
    """The pipeline class that a pipeline folder or Hub id declares in its model_index.json."""
    diffusers = require_diffusers()
    try:
        return diffusers.DiffusionPipeline.load_config(model)["_class_name"]
    except (OSError, KeyError, ValueError) as exc:
        raise DiffusionError(
            f"'{model}' is not a diffusers pipeline folder (with model_index.json) nor a pipeline id reachable on the "
            f"Hugging Face Hub. ({exc})"
        ) from exc


def load_pipeline(model: str, vae: str | None = None, dtype: torch.dtype = torch.float32,
                  vae_dtype: torch.dtype | None = None) -> Any:  # fmt: skip
    """A Stable Diffusion or SDXL pipeline with its weights in `dtype` and its VAE in `vae_dtype` (default: `dtype`);
    `vae` replaces the pipeline's VAE (a folder or Hub id of an `AutoencoderKL`)."""
    diffusers = require_diffusers()
    pipeline_class(model)  # a clear error for a path that is no pipeline
    try:
        source = {"pretrained_model_name_or_path": vae} if vae else {"pretrained_model_name_or_path": model,
                                                                     "subfolder": "vae"}  # fmt: skip
        parts = {"vae": diffusers.AutoencoderKL.from_pretrained(**source, torch_dtype=vae_dtype or dtype)}
        pipe = diffusers.DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, **parts)
    except (OSError, ValueError) as exc:
        with_vae = f" with VAE '{vae}'" if vae else ""
        raise DiffusionError(f"cannot load pipeline '{model}'{with_vae}: {exc}") from exc
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, diffusers.UNet2DConditionModel) or not hasattr(pipe, "encode_prompt"):
        raise DiffusionError(
            f"'{model}' is a {type(pipe).__name__}; lily adapts the text-conditioned UNet of Stable Diffusion 1.x/2.x "
            "and SDXL pipelines."
        )
    return pipe


def is_sdxl(pipe: Any) -> bool:
    """Whether the pipeline's UNet takes SDXL's added conditions (the pooled text embedding and the time ids)."""
    return pipe.unet.config.addition_embed_type == "text_time"


@torch.no_grad()
def encode_prompt(pipe: Any, prompt: str, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The text conditioning the pipeline computes for `prompt` (without classifier-free guidance): the encoder
    hidden states [1, tokens, width], and SDXL's pooled text embedding [1, width] (None for Stable Diffusion 1.x, 2.x).
    """
    encoded = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    return encoded[0], encoded[2] if is_sdxl(pipe) else None


def load_into_pipeline(pipe: Any, adapter_dir: str | os.PathLike, merge: bool = False) -> Any:
    """Load a Lily adapter trained on the pipeline's UNet (a `lily.save_adapter` folder) into `pipe.unet`, frozen,
    and return `pipe`.

    With `merge=True` the update is folded into the UNet's weights and the adapter taken off, so generation runs at
    the base model's speed. That needs input-independent routing (`static` or `uniform`); otherwise a MergeError is
    raised and the pipeline is left as it was.
    """
    import lily

    lily.load_adapter(pipe.unet, adapter_dir)
    if merge:
        try:
            lily.remove(pipe.unet, merge=True)
        except MergeError:
            lily.remove(pipe.unet)
            raise
    return pipe
