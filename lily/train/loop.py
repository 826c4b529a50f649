"""`train`: fine-tune, evaluate and save one run, on top of `accelerate`.

The story of a run: check the output directory and that plot.png can be drawn, find the model (building a
bundled one on first use; a Hub id fails at once offline), load the data, seed, build the model and apply the
method, evaluate the untouched model on the test split (step 0), train with periodic validation keeping the
best weights, then test the best weights and write metrics.json and plot.png. A checkpoint is written at the
end of every epoch and on Ctrl-C; `resume=True` continues from it with the same result as an uninterrupted
run, and on a finished run changes nothing. Ctrl-C anywhere raises `Interrupted`, whose message says what
was kept; every phase that takes a while shows a progress bar on a terminal.

The output directory is checked first but written (and, to start again, cleared) only once data, model and
method are ready. An optimizer step whose gradients hold inf or NaN is skipped; `MAX_SKIPPED_STEPS` in a row
stop the run, and no tensor holding inf or NaN is ever saved.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import sys
import time
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

import lily
from lily.distributed import fully_shard_blocks, is_sharded, reshard
from lily.errors import LilyError
from lily.hub import write_model_card
from lily.train.config import TrainConfig
from lily.train.console import Interrupted, progress_bar
from lily.train.data import load_task_data
from lily.train.methods import (
    apply_method,
    load_trainable_state,
    restore_trained,
    save_trained,
    trainable_state,
    up_projections,
)
from lily.train.outputs import (
    ADAPTER_DIR,
    METRICS_FILE,
    Progress,
    baseline_run,
    check_output_dir,
    check_plotting,
    claim_output_dir,
    load_checkpoint,
    read_metrics,
    reference_runs,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_json_atomic,
    write_plot,
)
from lily.train.tasks import Task, build_task, head_modules, locate_model


class TrainingError(LilyError, RuntimeError):
    """Training cannot go on (non-finite loss, gradients or weights; out of memory)."""


MAX_SKIPPED_STEPS = 5
"""Optimizer steps in a row skipped for non-finite gradients after which training stops."""


class EpochSampler(Sampler[int]):
    """A permutation of the training set drawn from `seed + epoch`: the same order on every process and resume."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.size


def lr_factor(total: int, warmup: int, schedule: str, floor: float):
    """Multiplier of the peak lr at each step: linear warm-up, then linear or cosine decay down to `floor`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 1 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * decay

    return factor


def evaluate(task: Task, model: torch.nn.Module, loader: DataLoader, accelerator: Any, desc: str | None = None
             ) -> float:  # fmt: skip
    """The task metric over a whole split, from per-example statistics gathered over processes; `desc` names
    a progress bar over the batches (on the main process, on a terminal).

    `gather_for_metrics` drops the duplicates accelerate pads the last batch with, so every example
    counts exactly once however many processes share the split.
    """
    was_training = model.training
    model.eval()
    dtype = torch.float32 if accelerator.device.type == "mps" else torch.float64  # MPS has no float64
    totals = None
    with torch.no_grad():
        for batch in progress_bar(loader, desc=desc, show=desc is not None and accelerator.is_main_process):
            sums = accelerator.gather_for_metrics(task.example_scores(model, batch).to(dtype)).sum(dim=0)
            totals = sums if totals is None else totals + sums
    model.train(was_training)
    if totals is None:
        raise TrainingError("cannot evaluate on an empty split.")
    return task.finish(totals)


def _better(task: Task, new: float, old: float | None) -> bool:
    return old is None or (new > old if task.higher_is_better else new < old)


def whole_optimizer_state(model: torch.nn.Module, optimizer: Any, sharded: bool) -> dict[str, Any]:
    """The optimizer's state dict; with FSDP2, gathered whole (a collective) in a layout keyed by parameter name."""
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(reshard(model), optimizer.optimizer, options=options)


def load_optimizer_state(model: torch.nn.Module, optimizer: Any, state: dict[str, Any], sharded: bool) -> None:
    """Inverse of `whole_optimizer_state` (every rank passes the whole state)."""
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(reshard(model), optimizer.optimizer, state, options=options)


def nonfinite(named: Iterable[tuple[str, torch.Tensor | None]], accelerator: Any) -> str | None:
    """The name of a tensor in `named` holding inf or NaN on some process, or None.

    Each process checks its own tensors (the local part of a shard) and the verdicts are combined, so every
    process must call this, and all reach the same answer.
    """
    names, flags = [], []
    for name, tensor in named:
        if tensor is not None:
            names.append(name)
            flags.append(torch.isfinite(tensor.to_local() if is_sharded(tensor) else tensor).all())
    bad = [n for n, ok in zip(names, torch.stack(flags).tolist() if flags else [], strict=True) if not ok]
    if accelerator.num_processes > 1:
        anywhere = accelerator.reduce(torch.tensor(len(bad), device=accelerator.device), "sum").item()
        return (bad[0] if bad else "a tensor of another process") if anywhere else None
    return bad[0] if bad else None


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _oom_message(cfg: TrainConfig) -> str:
    return (
        f"out of memory at --batch-size {cfg.batch_size}: lower --batch-size (raise --grad-accum to keep the "
        f"effective batch), lower --max-length ({cfg.max_length}) or --image-size ({cfg.image_size}), add "
        "--gradient-checkpointing, or use --mixed-precision bf16."
    )


@dataclasses.dataclass
class _Kept:
    """What Ctrl-C leaves at the current phase of a run (the message of `Interrupted`)."""

    message: str


def train(cfg: TrainConfig, log=print) -> dict[str, Any]:
    """Run `cfg` end to end and return the metrics written to metrics.json (on a finished run with `resume`,
    those it holds). Ctrl-C raises `Interrupted`, saying what was kept: a checkpoint during training."""
    kept = _Kept(f"nothing was written to {cfg.output_dir}." if not cfg.resume else
                 f"the run in {cfg.output_dir} is unchanged; continue it with --resume.")  # fmt: skip
    try:
        return _train(cfg, log, kept)
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted(kept.message) from None


def _train(cfg: TrainConfig, log: Any, kept: _Kept) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    # accelerate keeps one state per process; forget the previous run's (its mixed precision, say) so that
    # train() can be called again from a notebook. The distributed process group is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    # accelerate runs several CPU processes (gloo) only when told cpu=True, so say so when there is no GPU.
    no_gpu = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                              cpu=cfg.cpu or no_gpu)  # fmt: skip
    if accelerator.distributed_type.name == "FSDP":
        raise TrainingError(
            "lily train does not use accelerate's FSDP plugin; launch with torchrun (or accelerate's multi-GPU "
            "config) and pass --fsdp, which shards with FSDP2 and Lily's wrap policy."
        )
    out = check_output_dir(cfg)  # writes nothing: the directory is claimed once the run can start
    log = log if accelerator.is_main_process else (lambda *a, **k: None)
    finished = read_metrics(out) if cfg.resume else None
    if finished is not None:
        log(f"the run in {out} is finished (test {finished['metric']} {finished['test']:.4f}); nothing to resume, "
            "nothing changed.")  # fmt: skip
        return finished
    check_plotting()
    baseline = baseline_run(cfg)
    locate_model(cfg.model)  # a bundled model is built now, before seeding: the first run equals every later one
    data = load_task_data(cfg)
    log(f"data {data.source}: " + ", ".join(f"{k} {v:,}" for k, v in data.sizes().items()))
    set_seed(cfg.seed)  # right before the model, its new head and the method draw random numbers
    task = build_task(cfg, data)
    head = head_modules(task.model)
    model, info = apply_method(cfg, task.model, head)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.fsdp:  # before the optimizer is built: sharding replaces the parameters
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
        model = fully_shard_blocks(model.to(accelerator.device), param_dtype=dtype)
    log(_describe(cfg, info))

    # Each loader gets its own generator: a new iterator otherwise draws from the global RNG, and a resumed
    # run would then see different dropout masks than an uninterrupted one.
    def make_loader(split: str, **kw: Any) -> DataLoader:
        return DataLoader(task.examples(split), batch_size=cfg.batch_size, collate_fn=task.collate,
                          generator=torch.Generator().manual_seed(cfg.seed), **kw)  # fmt: skip

    train_loader = make_loader("train", sampler=EpochSampler(len(task.examples("train")), cfg.seed))
    test_loader = make_loader("test")
    val_loader = test_loader if cfg.select_on_test else make_loader("validation")
    selected_on = "test" if cfg.select_on_test else "validation"
    head_ids = {id(p) for h in head for p in model.get_submodule(_head_path(model, h)).parameters()}
    named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trainable = [p for _, p in named_trainable]
    up_ids = up_projections(model) if cfg.lr_ratio_B != 1 else set()  # one group less: older checkpoints resume
    groups = [{"params": [p for p in trainable if id(p) not in head_ids | up_ids], "lr": cfg.lr},
              {"params": [p for p in trainable if id(p) in up_ids - head_ids], "lr": cfg.lr * cfg.lr_ratio_B},
              {"params": [p for p in trainable if id(p) in head_ids], "lr": cfg.head_lr or cfg.lr}]  # fmt: skip
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)
    if cfg.fsdp:  # FSDP2 syncs its own gradients; accelerate must not wrap the model in DDP
        optimizer, train_loader, val_loader, test_loader = accelerator.prepare(
            optimizer, train_loader, val_loader, test_loader
        )
    else:
        model, optimizer, train_loader, val_loader, test_loader = accelerator.prepare(
            model, optimizer, train_loader, val_loader, test_loader
        )
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum)
    total = min(steps_per_epoch * cfg.epochs, cfg.max_steps or sys.maxsize)
    warmup = min(total, cfg.warmup_steps) if cfg.warmup_steps is not None else round(cfg.warmup_ratio * total)
    schedule = lr_factor(total, warmup, cfg.schedule, cfg.min_lr / cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    unwrapped = accelerator.unwrap_model(model)
    accelerator.wait_for_everyone()  # every process got this far before the main one clears and writes
    if accelerator.is_main_process:
        claim_output_dir(cfg)
    accelerator.wait_for_everyone()
    if not cfg.resume:
        kept.message = f"stopped before training began; run the same command again to start over in {out}."

    progress = Progress()
    if cfg.resume:
        tensors, state = load_checkpoint(out)
        load_trainable_state(unwrapped, tensors)
        load_optimizer_state(unwrapped, optimizer, state["optimizer"], cfg.fsdp)
        scheduler.load_state_dict(state["scheduler"])
        progress = Progress(**state["progress"])
        set_rng_state(state["rng"])
        log(f"resumed at step {progress.step} (epoch {progress.epoch + 1}, batch {progress.batch_in_epoch})")
    else:
        progress.test_before = evaluate(task, model, test_loader, accelerator, desc="scoring test, untrained")
        log(f"test {task.metric_name} before training (step 0): {progress.test_before:.4f}")

    def snapshot() -> tuple[Progress, dict]:
        """Progress and RNG state at an optimizer-step boundary: what a checkpoint written later must hold."""
        lists = {name: list(getattr(progress, name)) for name in ("history", "loss_curve", "val_curve")}
        return dataclasses.replace(progress, **lists), rng_state()

    synced, synced_rng = snapshot()
    started = time.perf_counter() - progress.wall_time

    def refuse_nonfinite(named: Iterable[tuple[str, torch.Tensor]], step: int) -> None:
        """Stop rather than save a tensor holding inf or NaN (every process calls this)."""
        bad = nonfinite(named, accelerator)
        if bad is not None:
            raise TrainingError(
                f"trainable tensor {bad} holds inf or NaN at step {step}; stopped without saving it. The last good "
                f"checkpoint and the best adapter are kept in {out}. {_fix(cfg)}"
            )

    def checkpoint(at: Progress, rng: dict) -> None:
        at.wall_time = time.perf_counter() - started
        tensors = trainable_state(unwrapped)  # with --fsdp, every rank gathers
        refuse_nonfinite(tensors.items(), at.step)
        optimizer_state = whole_optimizer_state(unwrapped, optimizer, cfg.fsdp)
        if accelerator.is_main_process:
            save_checkpoint(out, tensors, optimizer_state, scheduler, at, rng)
        accelerator.wait_for_everyone()

    def validate() -> float:
        if progress.val_curve and progress.val_curve[-1]["step"] == progress.step:  # --eval-every at an epoch end
            return progress.val_curve[-1]["val_metric"]
        metric = evaluate(task, model, val_loader, accelerator, desc=f"scoring {selected_on}")
        progress.val_curve.append({"step": progress.step, "val_metric": metric})
        if _better(task, metric, progress.best_metric):
            refuse_nonfinite(((n, p) for n, p in reshard(unwrapped).named_parameters() if p.requires_grad),
                             progress.step)  # fmt: skip
            progress.best_metric, progress.best_step = metric, progress.step
            if accelerator.is_main_process or cfg.fsdp:  # with --fsdp every rank gathers, the main one writes
                save_trained(unwrapped, cfg, out / ADAPTER_DIR)
            accelerator.wait_for_everyone()
        return metric

    def close_epoch() -> None:
        last = progress.epoch + 1 == cfg.epochs or progress.step >= total
        val = validate() if last or (progress.epoch + 1) % cfg.eval_epochs == 0 else None
        loss = progress.epoch_loss_sum / max(1, progress.epoch_batches)
        progress.history.append({"epoch": progress.epoch + 1, "step": progress.step, "train_loss": loss,
                                 "val_metric": val})  # fmt: skip
        shown = "not evaluated" if val is None else f"{val:.4f}"
        log(f"epoch {progress.epoch + 1}: train loss {loss:.4f}, {selected_on} {task.metric_name} {shown}")

    bar = progress_bar(desc=f"{cfg.method} {cfg.task}", total=total, unit="step", leave=True,
                       show=accelerator.is_main_process)  # fmt: skip
    bar.update(min(progress.step, total))  # where a resumed run stands
    skipped_in_a_row = 0
    model.train()
    try:
        while progress.epoch < cfg.epochs and progress.step < total:
            loader = train_loader
            if progress.batch_in_epoch:
                loader = accelerator.skip_first_batches(train_loader, progress.batch_in_epoch)
            loader.set_epoch(progress.epoch)  # accelerate re-seeds the sampler from this on every pass
            tick, seen = time.perf_counter(), 0
            for batch in loader:
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    if cfg.expert_diversity:
                        loss = loss + cfg.expert_diversity * lily.expert_diversity(accelerator.unwrap_model(model))
                    if not torch.isfinite(loss):
                        raise TrainingError(
                            f"the training loss became {loss.item()} at step {progress.step + 1} (epoch "
                            f"{progress.epoch + 1}); stopped. The last good checkpoint and the best adapter are kept "
                            f"in {out}. {_fix(cfg)}"
                        )
                    accelerator.backward(loss)
                    finite = True
                    if accelerator.sync_gradients:
                        if cfg.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)  # unscales fp16 gradients
                        else:
                            accelerator.unscale_gradients()
                        finite = nonfinite(((n, p.grad) for n, p in named_trainable), accelerator) is None
                    if finite or accelerator.scaler is not None:  # fp16: the GradScaler skips it and lowers its scale
                        optimizer.step()
                    optimizer.zero_grad()
                value = loss.item()
                progress.batch_in_epoch += 1
                progress.epoch_loss_sum += value
                progress.epoch_batches += 1
                progress.interval_loss_sum += value
                progress.interval_batches += 1
                seen += len(next(iter(batch.values())))
                if not accelerator.sync_gradients:
                    continue
                if finite:
                    scheduler.step()
                else:  # the schedule advances on a skipped step by design; torch warns of that as misuse
                    with warnings.catch_warnings():
                        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`", UserWarning)
                        scheduler.step()
                progress.step += 1
                if finite:
                    skipped_in_a_row = 0
                else:
                    progress.skipped_steps += 1
                    # With fp16, overflows while the loss scale is still >= 1 are the GradScaler finding its scale.
                    if accelerator.scaler is None or accelerator.scaler.get_scale() < 1:
                        skipped_in_a_row += 1
                        log(f"step {progress.step}: a gradient holds inf or NaN; optimizer step skipped")
                    if skipped_in_a_row >= MAX_SKIPPED_STEPS:
                        raise TrainingError(
                            f"the gradients held inf or NaN at {MAX_SKIPPED_STEPS} optimizer steps in a row (steps "
                            f"{progress.step - MAX_SKIPPED_STEPS + 1} to {progress.step}, epoch {progress.epoch + 1}); "
                            f"stopped. The last good checkpoint and the best adapter are kept in {out}. {_fix(cfg)}"
                        )
                bar.update(1)
                if progress.step % cfg.log_every == 0 or progress.step == total:
                    mean = progress.interval_loss_sum / progress.interval_batches
                    progress.loss_curve.append({"step": progress.step, "train_loss": mean})
                    progress.interval_loss_sum, progress.interval_batches = 0.0, 0
                    rate = seen * accelerator.num_processes / (time.perf_counter() - tick)
                    bar.set_postfix(loss=f"{mean:.4f}", ex_per_s=f"{rate:.1f}")
                    if bar.disable:  # no terminal: a plain line instead of the bar
                        log(f"step {progress.step}/{total}: training loss {mean:.4f}, {rate:.1f} examples/s")
                if cfg.eval_every and progress.step % cfg.eval_every == 0:
                    validate()
                synced, synced_rng = snapshot()
                if progress.step >= total:
                    break
            close_epoch()
            progress.epoch += 1
            progress.batch_in_epoch, progress.epoch_loss_sum, progress.epoch_batches = 0, 0.0, 0
            synced, synced_rng = snapshot()
            checkpoint(progress, synced_rng)
            kept.message = f"the checkpoint of step {progress.step} in {out} is kept; continue with --resume."
    except KeyboardInterrupt:  # a second Ctrl-C while this saves leaves the previous checkpoint (`kept`)
        bar.close()
        checkpoint(synced, synced_rng)
        raise Interrupted(f"checkpoint saved at step {synced.step} in {out}; continue with --resume.") from None
    except torch.OutOfMemoryError as exc:
        raise TrainingError(_oom_message(cfg)) from exc
    bar.close()
    kept.message = f"training is finished and checkpointed in {out}; --resume scores the test split and saves it."

    restore_trained(unwrapped, cfg, out / ADAPTER_DIR)
    test = evaluate(task, model, test_loader, accelerator, desc="scoring test")
    metrics = {
        "task": cfg.task,
        "method": cfg.method,
        "metric": task.metric_name,
        "higher_is_better": task.higher_is_better,
        "parameters": {**dataclasses.asdict(info), "base_model": sum(p.numel() for p in unwrapped.parameters())},
        "data": data.sizes(),
        "labels": data.labels,
        "history": progress.history,
        "loss_curve": progress.loss_curve,
        "val_curve": progress.val_curve,
        "test_before": progress.test_before,
        "best_val": progress.best_metric,
        "selected_on": selected_on,
        "best_step": progress.best_step,
        "test": test,
        "steps": progress.step,
        "skipped_steps": progress.skipped_steps,
        "wall_time_s": round(time.perf_counter() - started, 2),
        "peak_memory_bytes": peak_memory(accelerator.device),
        "device": str(accelerator.device),
        "num_processes": accelerator.num_processes,
        "config": cfg.to_dict(),
        "references": reference_runs(out, cfg, baseline),
    }
    if accelerator.is_main_process:
        write_json_atomic(out / METRICS_FILE, metrics)
        write_plot(out, metrics, metrics["references"])
        if cfg.method == "lily":  # the adapter folder can be pushed to the Hub as it is
            write_model_card(unwrapped, out / ADAPTER_DIR, training=_card_facts(cfg, metrics))
    log(f"test {task.metric_name}: {test:.4f} (before training, step 0: {progress.test_before:.4f})")
    best = f"{progress.best_metric:.4f} at step {progress.best_step}"
    log(f"best {selected_on} {task.metric_name} {best}; results in {out}")
    return metrics


def _fix(cfg: TrainConfig) -> str:
    return f"Lower --lr ({cfg.lr}) or --scaling ({cfg.scaling}), or avoid --mixed-precision fp16."


def _card_facts(cfg: TrainConfig, metrics: dict[str, Any]) -> dict[str, Any]:
    """What a model card says about the run: the command, the data and the test metric before and after."""
    metric = metrics["metric"]
    return {
        "command": cfg.command(),
        "data": f"{cfg.data} ({', '.join(f'{k} {v:,}' for k, v in metrics['data'].items())})",
        f"test {metric}": f"{metrics['test']:.4f} (untrained: {metrics['test_before']:.4f})",
        f"best {metrics['selected_on']} {metric}": f"{metrics['best_val']:.4f} at step {metrics['best_step']}",
        "steps": metrics["steps"],
    }


def _head_path(model: torch.nn.Module, head: str) -> str:
    """Where head `head` sits inside a possibly PEFT-wrapped model."""
    names = [n for n, _ in model.named_modules() if n == head or n.endswith("." + head)]
    return min(names, key=len)


def _describe(cfg: TrainConfig, info: Any) -> str:
    matched = f"Lily {info.lily_budget:,} vs LoRA r={info.lora_r} {info.lora_params:,}"
    if cfg.method not in ("full", "head-only"):
        return f"{cfg.method}: {info.adapter:,} adapter + {info.head:,} head parameters (same targets: {matched})"
    return f"{cfg.method}: {info.trainable:,} trainable parameters ({info.head:,} in the head; {matched})"
