"""DreamBooth on SDXL: Lily on the UNet's attention projections, trained on a few photos of one subject.

The paper's settings (`subject-driven-generation/train_lily.sh` and `train_lily.py` of the official code, built on
diffusers' DreamBooth-LoRA-SDXL script): stabilityai/stable-diffusion-xl-base-1.0 with the madebyollin/sdxl-vae-fp16-fix
VAE; Lily on the UNet only, on `to_k`, `to_q`, `to_v` and `to_out.0`, with r = 4 and ne_1 = ne_2 = 4 per (target,
shape), scale 1; AdamW (betas 0.9/0.999, weight decay 1e-4, eps 1e-8) at a constant lr 1e-4 without warm-up,
gradients clipped at 1.0; batch 1 x 4 accumulation steps, 500 optimizer steps; fp16 mixed precision; 1024 px with a
random crop; seed 0; the instance prompt "a photo of {subject}", where the subject is the name of the image folder
(`bear_plushie`), for 7 subjects of the DreamBooth dataset. The paper shows images only: no metric to reproduce.

The loop (`train`): load the pipeline; put Lily on its UNet; encode the prompts once with the pipeline's own text
encoders and each image once with its VAE; then every step a latent sample, noise at a random timestep (a DDPM
scheduler built from the pipeline's scheduler config), the UNet's prediction, and the MSE against the noise (the
velocity for v-prediction models). With `--class-data` a class image joins each example, and its loss counts
`--prior-loss-weight` times (prior preservation). The adapter is saved by `lily.save_adapter` in OUTPUT/adapter.
The same code trains Stable Diffusion 1.x/2.x (`--model ... --resolution 512`): SDXL's pooled text embedding and
time ids are added when the UNet takes them.

Differences, stated: routing is per image ("sample"); the paper's code pools the router over the batch, which mixes
the instance and class images, and the two halves of classifier-free guidance at generation. B experts start at
zero; the paper's SDXL code leaves them at PyTorch's default init, so its update is not zero at step 0. No images
are generated during training, and a run cannot be resumed.

    lily recipe dreambooth-sdxl --data dreambooth/dataset/bear_plushie --output-dir out/bear_plushie
    python -m lily.recipes.dreambooth generate out/bear_plushie --prompt "a photo of {subject} in the jungle"
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from lily.diffusion import FP16_VAE, UNET_TARGETS, DiffusionError
from lily.errors import ConfigError, DataError, LilyError
from lily.routing import ROUTING_MODES

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}
"""--mixed-precision choices and the dtype the frozen weights load in."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SUBJECTS = ("bear_plushie", "grey_sloth_plushie", "monster_toy", "rc_car", "red_cartoon", "robot_toy", "wolf_plushie")
"""The DreamBooth subjects the paper trains (folders of google/dreambooth's dataset/)."""
RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"


def _opt(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DreamBoothConfig:
    """The options of `lily recipe dreambooth-sdxl`; the defaults are the paper's settings (see the module doc)."""

    data: str | None = _opt(None, "Folder of the subject's images, e.g. DreamBooth's dataset/bear_plushie.")
    model: str = _opt("stabilityai/stable-diffusion-xl-base-1.0",
                      "Pipeline folder or Hugging Face id: SDXL, or Stable Diffusion 1.x/2.x.")  # fmt: skip
    vae: str = _opt("auto", f"VAE folder or id that replaces the pipeline's. auto: {FP16_VAE} for SDXL under fp16 "
                            "(the paper's), else the pipeline's own; none: the pipeline's own.")  # fmt: skip
    subject: str | None = _opt(None, "The subject's identifier in the prompts (default: the --data folder's name).")
    instance_prompt: str = _opt("a photo of {subject}", "Prompt of the subject's images; {subject} becomes --subject.")
    class_data: str | None = _opt(None, "Folder of class images for prior preservation (default: none, no prior loss).")
    class_prompt: str | None = _opt(None, "Prompt of the class images, e.g. 'a photo of a teddy bear'.")
    prior_loss_weight: float = _opt(1.0, "Weight of the class images' loss.")
    output_dir: str = _opt("out/dreambooth", "Directory for adapter/, run.json and metrics.json.")
    overwrite: bool = _opt(False, "Replace a finished run in --output-dir.")
    targets: list[str] = _opt(UNET_TARGETS, "UNet module-name suffixes to adapt.")  # noqa: RUF009
    r: int = _opt(4, "Lily rank.")
    num_A: int = _opt(4, "Lily A groups per target type (target and shape).")
    num_B: int = _opt(4, "Lily B experts per target type.")
    scaling: float = _opt(1.0, "Lily scaling s.")
    routing: str = _opt("sample", "Lily routing; static or uniform can be merged into the UNet.", choices=ROUTING_MODES)
    lr: float = _opt(1e-4, "AdamW learning rate, constant.")
    weight_decay: float = _opt(1e-4, "AdamW weight decay.")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm.")
    max_steps: int = _opt(500, "Optimizer steps.")
    batch_size: int = _opt(1, "Subject images per micro-batch (plus as many class images).")
    grad_accum: int = _opt(4, "Micro-batches per optimizer step.")
    resolution: int = _opt(1024, "Images are resized (shorter side) and cropped to this square size.")
    center_crop: bool = _opt(False, "Crop the centre instead of a random square (drawn once per image).")
    mixed_precision: str = _opt("fp16", "fp16, bf16 or no (float32). A machine without a GPU trains in float32.",
                                choices=tuple(PRECISIONS))  # fmt: skip
    seed: int = _opt(0, "Seed of the crops, the image order, the noise and the timesteps.")

    def check(self) -> None:
        """Raise a DataError or ConfigError that names the flag at fault."""
        if not self.data:
            raise DataError("--data is required: the folder of the subject's images.")
        if bool(self.class_data) != bool(self.class_prompt):
            raise DataError("prior preservation needs both --class-data (a folder of images) and --class-prompt.")
        for name in ("max_steps", "batch_size", "grad_accum", "resolution"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")


RECIPES = {"dreambooth-sdxl": asdict(DreamBoothConfig())}
DESCRIPTIONS = {"dreambooth-sdxl": "DreamBooth on SDXL (diffusers): Lily on the UNet's attention, r 4, 500 steps; "
                                   "its own flags, see `lily recipe dreambooth-sdxl --help`."}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """One flag per DreamBoothConfig field."""
    parser = argparse.ArgumentParser(prog="lily recipe dreambooth-sdxl", description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    for f in fields(DreamBoothConfig):
        default = f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]
        kw: dict[str, Any] = {"default": default, "help": f.metadata["help"], "choices": f.metadata.get("choices")}
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):
            kw["nargs"] = "+"
        else:
            kw["type"] = str if default is None else type(default)
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, **kw)
    return parser


def image_files(folder: str, flag: str) -> list[Path]:
    """The images in `folder`, sorted by name."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{flag} {folder}: not a folder.")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{flag} {folder}: holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    return files


@dataclass
class Example:
    """One training image, resized and cropped, with SDXL's time ids: original size, crop corner, target size."""

    pixels: torch.Tensor
    time_ids: list[int]


def prepare_image(path: Path, resolution: int, center_crop: bool, rng: random.Random) -> Example:
    """Resize the shorter side to `resolution`, crop a square (centre or random), scale the pixels to [-1, 1]."""
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    height, width = image.height, image.width
    scale = resolution / min(height, width)
    image = image.resize((max(resolution, round(width * scale)), max(resolution, round(height * scale))),
                         Image.Resampling.BILINEAR)  # fmt: skip
    spare_y, spare_x = image.height - resolution, image.width - resolution
    top, left = (spare_y // 2, spare_x // 2) if center_crop else (rng.randint(0, spare_y), rng.randint(0, spare_x))
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return Example(pixels, [height, width, top, left, resolution, resolution])


@torch.no_grad()
def encode_images(vae: Any, examples: list[Example], device: torch.device) -> list[Any]:
    """Each image's latent distribution under the VAE (a fresh latent is sampled from it at every step)."""
    return [vae.encode(e.pixels[None].to(device, vae.dtype)).latent_dist for e in examples]


def index_stream(length: int, rng: random.Random) -> Iterator[int]:
    """0..length-1 in a new random order every epoch, without end."""
    while True:
        order = list(range(length))
        rng.shuffle(order)
        yield from order


def resolve_vae(vae: str, model: str, precision: str) -> str | None:
    """The VAE that replaces the pipeline's, or None to keep the pipeline's own."""
    from lily.diffusion import pipeline_class

    if vae == "auto":
        return FP16_VAE if precision == "fp16" and pipeline_class(model) == "StableDiffusionXLPipeline" else None
    return None if vae == "none" else vae


def denoising_loss(unet: Any, scheduler: Any, latents: torch.Tensor, embeds: torch.Tensor, added: dict | None,
                   is_class: torch.Tensor, prior_loss_weight: float) -> torch.Tensor:  # fmt: skip
    """Noise `latents` at random timesteps and score the UNet's prediction: the MSE on the subject's images, plus
    `prior_loss_weight` times the MSE on the class images."""
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), device=latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    errors = torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    loss = errors[~is_class].mean()
    return loss + prior_loss_weight * errors[is_class].mean() if is_class.any() else loss


def micro_batch(rows: list[tuple[int, int]], latents: list[list[Any]], examples: list[list[Example]],
                conditions: list[tuple[torch.Tensor, torch.Tensor | None]], scale: float,
                sdxl: bool) -> tuple[torch.Tensor, torch.Tensor, dict | None, torch.Tensor]:  # fmt: skip
    """The UNet inputs of one micro-batch, given (kind, image) rows with kind 0 for the subject and 1 for the class:
    fresh latent samples, the prompt embeddings, SDXL's added conditions (None otherwise), and which rows are class
    images."""
    x = torch.cat([latents[kind][i].sample().float() for kind, i in rows]) * scale
    embeds = torch.cat([conditions[kind][0] for kind, _ in rows])
    added = None
    if sdxl:
        added = {"text_embeds": torch.cat([conditions[kind][1] for kind, _ in rows]),
                 "time_ids": torch.tensor([examples[kind][i].time_ids for kind, i in rows], device=embeds.device,
                                          dtype=embeds.dtype)}  # fmt: skip
    return x, embeds, added, torch.tensor([kind == 1 for kind, _ in rows], device=embeds.device)


def train(cfg: DreamBoothConfig, log: Any = print) -> dict[str, Any]:
    """Train a Lily adapter on the pipeline's UNet; write OUTPUT/adapter, run.json and metrics.json; return the
    metrics."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    import lily
    from lily.diffusion import encode_prompt, is_sdxl, load_pipeline, require_diffusers
    from lily.train.outputs import RunDirError, write_json_atomic

    diffusers = require_diffusers()
    cfg.check()
    out = Path(cfg.output_dir)
    if (out / RUN_FILE).exists() and not cfg.overwrite:
        raise RunDirError(f"--output-dir {out} holds a finished run; pass --overwrite to replace it.")
    gpu = torch.cuda.is_available()
    precision = cfg.mixed_precision if gpu else "no"
    if precision != cfg.mixed_precision:
        log(f"no GPU: training in float32 instead of --mixed-precision {cfg.mixed_precision}")
    vae = resolve_vae(cfg.vae, cfg.model, precision)
    rng = random.Random(cfg.seed)
    instances = [prepare_image(p, cfg.resolution, cfg.center_crop, rng) for p in image_files(cfg.data, "--data")]
    classes = ([prepare_image(p, cfg.resolution, cfg.center_crop, rng) for p in image_files(cfg.class_data,
                "--class-data")] if cfg.class_data else [])  # fmt: skip
    subject = cfg.subject or Path(cfg.data).resolve().name
    prompt = cfg.instance_prompt.replace("{subject}", subject)

    set_seed(cfg.seed)
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=cfg.grad_accum, cpu=not gpu)
    device = accelerator.device
    # the stock VAEs overflow in float16: diffusers' training scripts keep them in float32, as here
    pipe = load_pipeline(cfg.model, vae, PRECISIONS[precision], PRECISIONS[precision] if vae else torch.float32)
    if pipe.scheduler.config.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction"):
        raise DiffusionError(f"--model {cfg.model} predicts '{pipe.scheduler.config.prediction_type}'; the recipe "
                             "trains epsilon and v-prediction models.")  # fmt: skip
    pipe.to(device)
    conditions = [encode_prompt(pipe, prompt, device)] + ([encode_prompt(pipe, cfg.class_prompt, device)]
                                                          if classes else [])  # fmt: skip
    latents = [encode_images(pipe.vae, instances, device), encode_images(pipe.vae, classes, device)]
    scale = pipe.vae.config.scaling_factor
    for part in ("vae", "text_encoder", "text_encoder_2"):  # only the UNet stays on the accelerator
        if getattr(pipe, part, None) is not None:
            getattr(pipe, part).to("cpu")

    unet = pipe.unet
    lily.inject(unet, lily.LilyConfig(target_modules=cfg.targets, r=cfg.r, num_A=cfg.num_A, num_B=cfg.num_B,
                                      scaling=cfg.scaling, routing=cfg.routing))  # fmt: skip
    log(lily.summary(unet))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    scheduler = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
    examples = [instances, classes]
    stream = index_stream(max(len(instances), len(classes)), rng)

    history: list[float] = []
    start = time.perf_counter()
    unet.train()
    bar = tqdm(range(cfg.max_steps), desc="dreambooth", unit="step", disable=not accelerator.is_local_main_process)
    for _ in bar:
        total = 0.0
        for _ in range(cfg.grad_accum):
            picks = [next(stream) for _ in range(cfg.batch_size)]
            rows = [(kind, k % len(examples[kind])) for kind in range(len(conditions)) for k in picks]
            inputs = micro_batch(rows, latents, examples, conditions, scale, is_sdxl(pipe))
            with accelerator.accumulate(unet):
                loss = denoising_loss(unet, scheduler, *inputs, cfg.prior_loss_weight)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            total += loss.item()
        history.append(total / cfg.grad_accum)
        bar.set_postfix(loss=f"{history[-1]:.4f}")

    metrics = {"loss": history, "adapter_parameters": lily.count_parameters(accelerator.unwrap_model(unet)),
               "instance_images": len(instances), "class_images": len(classes), "optimizer_steps": cfg.max_steps,
               "wall_time_s": round(time.perf_counter() - start, 1), "device": str(device),
               "mixed_precision": precision}  # fmt: skip
    if accelerator.is_main_process:
        lily.save_adapter(accelerator.unwrap_model(unet), out / "adapter")
        run = {**asdict(cfg), "recipe": "dreambooth-sdxl", "subject": subject, "instance_prompt": prompt, "vae": vae,
               "mixed_precision": precision, "sdxl": is_sdxl(pipe)}  # fmt: skip
        write_json_atomic(out / RUN_FILE, run)
        write_json_atomic(out / METRICS_FILE, metrics)
        log(f"adapter ({metrics['adapter_parameters']:,} parameters) saved in {out / 'adapter'}; "
            f"final loss {history[-1]:.4f}")  # fmt: skip
    return metrics


def run_recipe(argv: list[str]) -> int:
    """`lily recipe dreambooth-sdxl [flags]`: its own flags and loop, since a diffusers UNet is no `lily train` task."""
    args = build_parser().parse_args(argv)
    try:
        train(DreamBoothConfig(**vars(args)))
    except LilyError as exc:
        print(f"lily recipe dreambooth-sdxl: error: {exc}", file=sys.stderr)
        return 2
    return 0


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """The run.json of a finished dreambooth run."""
    try:
        return json.loads((Path(run_dir) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{run_dir} holds no finished dreambooth run ({RUN_FILE}): {exc}") from exc


def generate(prompts: list[str], output_dir: str | Path, run_dir: str | Path | None = None, model: str | None = None,
             num_images: int = 1, steps: int = 50, guidance_scale: float | None = None, seed: int = 0,
             merge: bool = False, log: Any = print) -> list[Path]:  # fmt: skip
    """Images for `prompts` from a run's pipeline with its adapter (`run_dir`), or from a pipeline alone (`model`,
    e.g. class images for prior preservation), saved as `<prompt>-<image>.png`; `{subject}` in a prompt becomes the
    run's subject. Image i of every prompt uses seed `seed + i`. `merge` folds the adapter into the UNet first."""
    from lily.diffusion import load_into_pipeline, load_pipeline

    if (run_dir is None) == (model is None):
        raise DataError("give a run directory (its pipeline and adapter) or --model (a pipeline alone), not both.")
    gpu = torch.cuda.is_available()
    run = read_run(run_dir) if run_dir is not None else {"model": model, "vae": None, "subject": None}
    if run["subject"] is None and any("{subject}" in p for p in prompts):
        raise DataError("a --prompt uses {subject}, which only a run directory defines.")
    pipe = load_pipeline(run["model"], run["vae"], torch.float16 if gpu else torch.float32)
    if run_dir is not None:
        load_into_pipeline(pipe, Path(run_dir) / "adapter", merge=merge)
    pipe.to("cuda" if gpu else "cpu")
    pipe.set_progress_bar_config(disable=True)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    options = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
    for p, text in enumerate(prompts):
        text = text if run["subject"] is None else text.replace("{subject}", run["subject"])
        for i in range(num_images):
            generator = torch.Generator(pipe.device).manual_seed(seed + i)
            image = pipe(text, num_inference_steps=steps, generator=generator, **options).images[0]
            files.append(out / f"{p:02d}-{i:03d}.png")
            image.save(files[-1])
            log(f"{files[-1]}\t{text}")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Images from a `lily recipe dreambooth-sdxl` run or a pipeline.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate images with a run's adapter (or --model without one)")
    gen.add_argument("run_dir", nargs="?", help="the --output-dir of a finished run")
    gen.add_argument("--model", help="a pipeline to run without adapter, e.g. to make class images")
    gen.add_argument("--prompt", action="append", required=True,
                     help="a prompt; {subject} is the run's subject; repeat for several")  # fmt: skip
    gen.add_argument("--num-images", type=int, default=1, help="images per prompt")
    gen.add_argument("--steps", type=int, default=50, help="denoising steps (the paper's inference uses 50)")
    gen.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the pipeline's)")
    gen.add_argument("--seed", type=int, default=0, help="image i of every prompt uses seed + i")
    gen.add_argument("--merge", action="store_true", help="fold the adapter into the UNet (static or uniform routing)")
    gen.add_argument("--output-dir", help="where the PNGs go (default: RUN_DIR/samples)")
    args = parser.parse_args(argv)
    try:
        if args.output_dir is None and args.run_dir is None:
            raise DataError("--output-dir is required with --model.")
        generate(args.prompt, args.output_dir or Path(args.run_dir) / "samples", args.run_dir, args.model,
                 args.num_images, args.steps, args.guidance_scale, args.seed, args.merge)  # fmt: skip
    except LilyError as exc:
        print(f"dreambooth generate: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
