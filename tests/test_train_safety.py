"""State `lily train` leaves can be trusted: resuming runs no code, --overwrite deletes only lily's own files and
only once the run can start, checkpoints are committed in one atomic step, and non-finite gradients are skipped
and never saved."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import lily.train.loop as loop
import lily.train.outputs as outputs
from lily.cli import main
from lily.train.loop import MAX_SKIPPED_STEPS, TrainingError, train
from lily.train.outputs import (
    Progress,
    RunDirError,
    check_output_dir,
    claim_output_dir,
    decode_state,
    encode_state,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tests.test_train import quiet, text_cfg

ROOT = Path(__file__).resolve().parent.parent


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Equal values of equal types all the way down (NaN equals NaN; tensors and arrays keep their dtype)."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def resume_state(step: int) -> dict[str, Any]:
    """What `train` checkpoints, from a real AdamW and LambdaLR, made different by `step`."""
    torch.manual_seed(step)
    random.seed(step)
    np.random.seed(step)
    param = torch.nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (s + 1))
    for _ in range(step % 3 + 1):
        param.grad = torch.randn(3, 2)
        optimizer.step()
        scheduler.step()
    progress = Progress(step=step, epoch=step // 10, batch_in_epoch=3, epoch_loss_sum=1 / 3, epoch_batches=3,
                        history=[{"epoch": 1, "step": step, "train_loss": 0.25, "val_metric": None}],
                        best_metric=float("nan") if step % 2 else float("-inf"), test_before=float("inf"))  # fmt: skip
    tensors = {"w": param.detach().clone(), "h": torch.arange(4, dtype=torch.int16)}
    return {"tensors": tensors, "optimizer": optimizer.state_dict(), "scheduler": scheduler, "progress": progress,
            "rng": rng_state()}  # fmt: skip


def save(out: Path, s: dict[str, Any]) -> None:
    save_checkpoint(out, s["tensors"], s["optimizer"], s["scheduler"], s["progress"], s["rng"])


def expected(s: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = {"optimizer": s["optimizer"], "scheduler": s["scheduler"].state_dict(), "rng": s["rng"],
             "progress": asdict(s["progress"])}  # fmt: skip
    return s["tensors"], state


def no_unpickling(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refuse)


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_resume_state_round_trips_exactly_without_unpickling(tmp_path, monkeypatch):
    s = resume_state(7)
    save(tmp_path, s)
    root = tmp_path / "checkpoint"
    pointer = json.loads((root / "current.json").read_text())
    assert pointer["format"] == "lily-checkpoint" and pointer["step"] == 7
    assert {p.name for p in root.iterdir()} == {"current.json", pointer["directory"]}
    files = sorted(p.name for p in (root / pointer["directory"]).iterdir())
    assert files == ["state.json", "state.safetensors", "trainable.safetensors"]
    no_unpickling(monkeypatch)
    tensors, state = load_checkpoint(tmp_path)
    assert_same((tensors, state), expected(s))
    assert state["rng"]["numpy"][1].dtype == np.uint32 and isinstance(state["rng"]["python"][1], tuple)
    draws = []
    for rng in (s["rng"], state["rng"]):
        set_rng_state(rng)
        draws.append((random.random(), np.random.random(), torch.rand(1).item()))
    assert draws[0] == draws[1]


def test_fsdp_layout_and_reserved_keys_round_trip():
    """`whole_optimizer_state` under FSDP2 keys the state by parameter name; '@' keys must not be read as markers."""
    moments = {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, dtype=torch.bfloat16)}
    value = {"state": {"lily_adapters.0.B": moments},
             "param_groups": [{"params": ["lily_adapters.0.B"], "betas": (0.9, 0.999), "lr": float("nan")}],
             "@tensor": "0", 5: [(1, "a"), None], (1, 2): np.zeros((2, 3), dtype=np.float16), "x": np.array(True),
             "empty": np.zeros(0, dtype=np.int64)}  # fmt: skip
    encoded, tensors = encode_state(value)
    text = json.dumps(encoded, allow_nan=False)  # strict JSON: no NaN literal
    assert_same(decode_state(json.loads(text), tensors), value)


@pytest.mark.parametrize(
    "entry",
    [{"@class": "os.system"}, {"@tensor": "0", "more": 1}, {"@tensor": 0}, {"@float": "1e999"},
     {"@numpy": "0", "dtype": "O", "shape": [1]}, {"@numpy": "0", "dtype": "V8", "shape": [1]}, {"@tuple": "abc"}],
)  # fmt: skip
def test_decoding_accepts_only_its_own_markers(entry, tmp_path):
    with pytest.raises(ValueError, match="unexpected entry"):
        decode_state({"ok": [1, entry]}, {"0": torch.zeros(8, dtype=torch.uint8)})
    save(tmp_path, resume_state(1))
    directory = outputs.checkpoint_dir(tmp_path)
    (directory / "state.json").write_text(json.dumps({"format": "lily-train-state", "version": 1, "state": entry}))
    with pytest.raises(RunDirError, match=r"checkpoint in .* cannot be read .*--overwrite"):
        load_checkpoint(tmp_path)


def test_checkpoint_pickled_by_an_older_version_is_refused_without_loading_it(tiny_bert_dir, text_csv, tmp_path):
    out, witness = tmp_path / "out", tmp_path / "code-ran"
    cfg = text_cfg(tiny_bert_dir, text_csv, out, resume=True)
    (out / "checkpoint").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps(cfg.run_identity()))

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(witness),)

    (out / "checkpoint" / "state.pt").write_bytes(pickle.dumps({"optimizer": Payload()}))
    message = r"older lily version \(state.pt, written with torch.save\).*can run arbitrary code.*--overwrite"
    with pytest.raises(RunDirError, match=message):
        check_output_dir(cfg)
    with pytest.raises(RunDirError, match=message):
        load_checkpoint(out)
    with pytest.raises(RunDirError, match=message):
        train(cfg, log=quiet)
    assert not witness.exists()


def foreign_and_lily_files(out: Path, identity: dict[str, Any] | None) -> None:
    """A run directory of the previous lily version (with leftovers of interrupted writes) plus the user's files."""
    for name in ("notes.txt", "data/keep.csv", ".hidden"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("mine")
    if identity is None:
        return
    (out / "run.json").write_text(json.dumps(identity))
    for name in ("metrics.json", "plot.png", "adapter/adapter_model.safetensors", "checkpoint/state.pt",
                 "checkpoint.old/state.pt", ".checkpoint-k2j4h5/state.pt", ".run.json.a8df9s", ".plot-x1y2.png",
                 ".metrics.json.0f3a.tmp"):  # fmt: skip
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("lily")


@pytest.mark.parametrize("run_json", [None, {"name": "my project"}, "not json"])
def test_overwrite_never_touches_a_directory_that_holds_no_lily_run(run_json, tiny_bert_dir, text_csv, tmp_path):
    out = tmp_path / "home"
    foreign_and_lily_files(out, None)
    if run_json is not None:
        (out / "run.json").write_text(run_json if isinstance(run_json, str) else json.dumps(run_json))
    before = files_of(out)
    with pytest.raises(RunDirError, match=rf"--output-dir {re.escape(str(out))} is not empty and holds no lily run"):
        train(text_cfg(tiny_bert_dir, text_csv, out, overwrite=True), log=quiet)
    assert files_of(out) == before


def test_overwrite_removes_only_what_lily_wrote(tiny_bert_dir, text_csv, tmp_path):
    out = tmp_path / "run"
    old = text_cfg(tiny_bert_dir, text_csv, out, lr=0.5)
    foreign_and_lily_files(out, old.run_identity())  # run.json as the previous version wrote it
    cfg = text_cfg(tiny_bert_dir, text_csv, out, overwrite=True)
    with pytest.raises(RunDirError, match=r"holds a different run \(it differs in lr\).*--resume continues only"):
        check_output_dir(text_cfg(tiny_bert_dir, text_csv, out, overwrite=True, resume=True))
    check_output_dir(cfg)
    claim_output_dir(cfg)
    assert sorted(files_of(out)) == [".hidden", "data/keep.csv", "notes.txt", "run.json"]
    assert {p.name for p in out.iterdir()} == {".hidden", "data", "notes.txt", "run.json"}
    assert json.loads((out / "run.json").read_text()) == cfg.run_identity()
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "run.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_overwrite_deletes_nothing_when_the_run_cannot_start(text_csv, tmp_path, capsys):
    out = tmp_path / "run"
    foreign_and_lily_files(out, text_cfg("some-model", text_csv, out).run_identity())
    before = files_of(out)
    code = main(["train", "--model", str(tmp_path / "no-such-model"), "--data", text_csv, "--output-dir", str(out),
                 "--overwrite"])  # fmt: skip
    assert code == 2 and "no-such-model" in capsys.readouterr().err
    assert files_of(out) == before


def test_failed_run_leaves_nothing_and_the_same_command_then_runs(tiny_bert_dir, text_csv, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", text_csv, "--output-dir", str(out), "--epochs", "1", "--batch-size", "8",
            "--max-train-samples", "none", "--max-eval-samples", "none", "--max-test-samples", "none"]  # fmt: skip
    assert main([*args, "--model", str(tmp_path / "no-such-model")]) == 2
    assert not out.exists()
    assert main([*args, "--model", tiny_bert_dir]) == 0, capsys.readouterr().err
    assert (out / "metrics.json").is_file()


class Fault(Exception):
    pass


def inject_faults(monkeypatch, fail_at: int | None) -> dict[str, int]:
    """Make the `fail_at`-th rename, fsync, mkdir or safetensors write fail (a torn file for the latter)."""
    seen = {"n": 0}

    def wrap(original, torn: bool = False):
        def call(*args, **kwargs):
            seen["n"] += 1
            if seen["n"] != fail_at:
                return original(*args, **kwargs)
            if torn:
                original(*args, **kwargs)
                with open(args[1], "r+b") as f:
                    f.truncate(os.path.getsize(args[1]) // 2)
            raise Fault(f"call {fail_at}")

        return call

    for name in ("replace", "rename", "fsync", "mkdir"):
        monkeypatch.setattr(os, name, wrap(getattr(os, name)))
    monkeypatch.setattr(outputs, "save_file", wrap(outputs.save_file, torn=True))
    return seen


def test_checkpoint_is_the_old_or_the_new_one_whichever_step_fails(tmp_path, monkeypatch):
    old, new, later = resume_state(1), resume_state(2), resume_state(3)
    (tmp_path / "count").mkdir()
    with monkeypatch.context() as m:
        seen = inject_faults(m, None)
        save(tmp_path / "count", old)
        seen["n"] = 0
        save(tmp_path / "count", new)
    steps = seen["n"]
    assert steps >= 8
    outcomes = set()
    for k in range(1, steps + 1):
        out = tmp_path / str(k)
        out.mkdir()
        save(out, old)
        with monkeypatch.context() as m, pytest.raises(Fault):
            inject_faults(m, k)
            save(out, new)
        loaded = load_checkpoint(out)
        outcome = "new" if loaded[1]["progress"]["step"] == 2 else "old"
        assert_same(loaded, expected(new if outcome == "new" else old))
        outcomes.add(outcome)
        save(out, later)
        assert_same(load_checkpoint(out), expected(later))
        root = out / "checkpoint"
        current = json.loads((root / "current.json").read_text())["directory"]
        assert {p.name for p in root.iterdir()} == {"current.json", current}, k  # no leftovers
        assert sorted(p.name for p in out.iterdir()) == ["checkpoint"], k
    assert outcomes == {"old", "new"}  # the last fault (syncing the renamed pointer) hits a committed save


CHILD = textwrap.dedent("""
    import sys, types
    from pathlib import Path
    import torch
    from lily.train.outputs import Progress, save_checkpoint

    out, step = Path(sys.argv[1]), int(sys.argv[2])
    while True:
        tensors = {"w": torch.full((256, 64), float(step)), "b": torch.full((64,), -float(step))}
        optimizer = {"state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.full((256, 64), step / 2)}},
                     "param_groups": [{"params": [0], "betas": (0.9, 0.999)}]}
        scheduler = types.SimpleNamespace(state_dict=lambda: {"last_epoch": step})
        save_checkpoint(out, tensors, optimizer, scheduler, Progress(step=step), {"seed": step})
        if step == int(sys.argv[2]):
            print("ready", flush=True)
        step += 1
""")


def test_checkpoint_survives_sigkill_at_any_moment(tmp_path):
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for start in (1, 1000, 2000):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), str(start)], stdout=subprocess.PIPE,
                                 text=True, env=env)  # fmt: skip
        try:
            assert child.stdout.readline() == "ready\n"
            time.sleep(rng.uniform(0.05, 0.4))
        finally:
            child.kill()  # SIGKILL
            child.wait()
        assert child.returncode == -signal.SIGKILL
        tensors, state = load_checkpoint(tmp_path)
        step = state["progress"]["step"]
        assert step >= start
        assert torch.equal(tensors["w"], torch.full((256, 64), float(step)))
        assert torch.equal(tensors["b"], torch.full((64,), -float(step)))
        assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], torch.full((256, 64), step / 2))
        assert state["optimizer"]["state"][0]["step"].item() == step and state["scheduler"] == {"last_epoch": step}
        assert state["rng"] == {"seed": step} and state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    save(tmp_path, resume_state(5))
    root = tmp_path / "checkpoint"
    assert len(list(root.iterdir())) == 2 and not [p for p in tmp_path.iterdir() if p.name != "checkpoint"]
    umask = os.umask(0)
    os.umask(umask)
    current = outputs.checkpoint_dir(tmp_path)
    assert (root / "current.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert current.stat().st_mode & 0o777 == 0o777 & ~umask
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in current.iterdir())


def poison_gradients(monkeypatch, bad: set[int] | None) -> dict[str, Any]:
    """Make the gradient of one Lily B expert inf at the backward passes numbered in `bad` (all when None); the
    loss stays finite. Records that expert's weights before each backward pass."""
    original, seen = loop.apply_method, {"n": 0, "before": []}

    def apply_method(cfg, model, head):
        model, info = original(cfg, model, head)
        param = next(p for n, p in model.named_parameters() if p.requires_grad and n.endswith(".B"))

        def hook(grad: torch.Tensor) -> torch.Tensor:
            seen["n"] += 1
            seen["before"].append(param.detach().clone())
            return torch.full_like(grad, math.inf) if bad is None or seen["n"] in bad else grad

        param.register_hook(hook)
        return model, info

    monkeypatch.setattr(loop, "apply_method", apply_method)
    return seen


def test_inf_gradient_skips_the_step_and_training_goes_on(tiny_bert_dir, text_csv, tmp_path, monkeypatch):
    seen = poison_gradients(monkeypatch, {3})
    metrics = train(text_cfg(tiny_bert_dir, text_csv, tmp_path / "run", epochs=1), log=quiet)
    assert metrics["skipped_steps"] == 1 and metrics["steps"] == 10 and seen["n"] == 10
    before = seen["before"]
    assert torch.equal(before[2], before[3])  # step 3 left the weights as they were
    assert not torch.equal(before[1], before[2]) and not torch.equal(before[3], before[4])  # other steps did not
    assert all(torch.isfinite(w).all() for w in before)
    adapter = load_file(next((tmp_path / "run" / "adapter").glob("*.safetensors")))
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())


def test_inf_gradients_in_a_row_stop_the_run_and_nothing_non_finite_is_saved(
    tiny_bert_dir, text_csv, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    seen = poison_gradients(monkeypatch, set(range(12, 100)))  # from the second step of epoch 2 on
    message = rf"gradients held inf or NaN at {MAX_SKIPPED_STEPS} optimizer steps in a row \(steps 12 to 16, epoch 2\)"
    with pytest.raises(TrainingError, match=message + r".*kept in .*Lower --lr"):
        train(text_cfg(tiny_bert_dir, text_csv, out), log=quiet)
    assert all(torch.equal(seen["before"][11], w) for w in seen["before"][12:])
    tensors, state = load_checkpoint(out)
    assert state["progress"]["step"] == 10
    saved = [*tensors.values(), *load_file(next((out / "adapter").glob("*.safetensors"))).values()]
    saved += [t for s in state["optimizer"]["state"].values() for t in s.values()]
    assert saved and all(torch.isfinite(t).all() for t in saved)


def test_run_stopped_before_its_first_checkpoint_starts_again_without_flags(
    tiny_bert_dir, text_csv, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    cfg = text_cfg(tiny_bert_dir, text_csv, out, epochs=1)
    with monkeypatch.context() as m, warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        poison_gradients(m, None)
        with pytest.raises(TrainingError, match=r"steps 1 to 5, epoch 1"):
            train(cfg, log=quiet)
    assert not [w for w in seen if "lr_scheduler.step()" in str(w.message)]  # skipped steps advance it by design
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]  # nothing to resume
    assert train(cfg, log=quiet)["skipped_steps"] == 0


@pytest.mark.parametrize("eval_epochs", [1, 2])  # the adapter save (1) or the checkpoint (2) comes first
def test_non_finite_weights_are_never_saved(eval_epochs, tiny_bert_dir, text_csv, tmp_path, monkeypatch):
    out = tmp_path / "run"
    original, calls = torch.optim.AdamW.step, {"n": 0}

    def step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 10:  # the last step of epoch 1: a finite gradient, a non-finite update
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(math.nan)
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(TrainingError, match=r"trainable tensor \S+ holds inf or NaN at step 10; stopped without"):
        train(text_cfg(tiny_bert_dir, text_csv, out, eval_epochs=eval_epochs), log=quiet)
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]
