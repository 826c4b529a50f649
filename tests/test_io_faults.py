"""A save that fails or is killed at any point leaves the old adapter or the new one, never a mix."""

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import lily
import lily.io
from lily import CheckpointError
from lily.adapter import saved_parameters
from lily.io import CONFIG_NAME, TEMP_PREFIX, WEIGHTS_NAME
from tests.helpers import randomize_adapter, tiny_llama
from tests.test_io import write_v1


def llama_adapter(seed: int, scaling: float) -> nn.Module:
    torch.manual_seed(0)
    model = lily.inject(tiny_llama(), lily.LilyConfig(target_modules=["q_proj", "v_proj"], r=4, num_B=3,
                                                      scaling=scaling))  # fmt: skip
    randomize_adapter(model, seed=seed)
    return model


def which(directory: Path, references: dict[str, nn.Module], build) -> str:
    """The name of the reference adapter that `directory` loads as (exactly: config and every tensor)."""
    loaded = lily.load_adapter(build(), directory)
    tensors = saved_parameters(loaded)
    for label, reference in references.items():
        expected = saved_parameters(reference)
        if lily.get_adapter(loaded).config == lily.get_adapter(reference).config and all(
            torch.equal(tensors[k], v) for k, v in expected.items()
        ):
            return label
    raise AssertionError(f"{directory} loads as neither of {list(references)}: a mix")


class Faults:
    """Makes the n-th file-system call lily.io makes fail, after copying the directory as a crash would leave it."""

    CALLS = ("open", "write", "fsync", "replace", "close")

    def __init__(self, monkeypatch: pytest.MonkeyPatch, directory: Path, crash_copy: Path, fail_at: int) -> None:
        self.count, self.fail_at, self.directory, self.crash_copy = 0, fail_at, directory, crash_copy
        for name in self.CALLS:
            monkeypatch.setattr(os, name, self.wrap(getattr(os, name)))

    def wrap(self, real):
        def call(*args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__") == "lily.io":
                self.count += 1
                if self.count == self.fail_at:
                    shutil.copytree(self.directory, self.crash_copy)  # the files if the process died here
                    raise OSError(f"injected fault in os.{real.__name__}")
            return real(*args, **kwargs)

        return call


@pytest.mark.parametrize("before", ["old", "v1", "empty"])
def test_every_failing_step_of_a_save_leaves_the_old_or_the_new_adapter(tmp_path, monkeypatch, before):
    references = {"old": llama_adapter(0, 0.5), "new": llama_adapter(1, 0.25)}
    template = tmp_path / "template"
    template.mkdir()
    if before != "empty":
        lily.save_adapter(references["old"], template)
    if before == "v1":
        write_v1(template)
    seen = set()
    for fail_at in range(1, 100):
        directory, crash = tmp_path / f"dir{fail_at}", tmp_path / f"crash{fail_at}"
        shutil.copytree(template, directory)
        with monkeypatch.context() as patch:
            faults = Faults(patch, directory, crash, fail_at)
            try:
                lily.save_adapter(references["new"], directory)
            except OSError as exc:
                assert "injected fault" in str(exc)
        if faults.count < fail_at:
            assert which(directory, references, tiny_llama) == "new"
            break
        for state in (directory, crash):  # the save raised; the process died
            try:
                seen.add((state.name[:3], which(state, references, tiny_llama)))
            except CheckpointError as exc:
                assert before == "empty", exc
                assert "lily_config.json is missing" in str(exc)
                seen.add((state.name[:3], "none"))
        lily.save_adapter(references["new"], directory)  # the next save cleans up after the failed one
        assert not [f for f in os.listdir(directory) if f.startswith(TEMP_PREFIX)]
        assert sorted(os.listdir(directory)) == [WEIGHTS_NAME, CONFIG_NAME]
        assert which(directory, references, tiny_llama) == "new"
    else:
        raise AssertionError("the save never completed")
    first = "none" if before == "empty" else "old"
    assert {("dir", first), ("dir", "new"), ("cra", first), ("cra", "new")} <= seen, seen


def test_an_interrupted_commit_is_recovered_by_load_and_finished_by_the_next_save(tmp_path, monkeypatch):
    references = {"old": llama_adapter(0, 0.5), "new": llama_adapter(1, 0.25), "third": llama_adapter(2, 1.0)}
    lily.save_adapter(references["old"], tmp_path)
    real_replace = os.replace

    def crash_before_config_rename(src, dst):
        if Path(dst).name == CONFIG_NAME:
            raise KeyboardInterrupt  # stands for the process dying between the two renames
        real_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", crash_before_config_rename)
        with pytest.raises(KeyboardInterrupt):
            lily.save_adapter(references["new"], tmp_path)
    assert which(tmp_path, references, tiny_llama) == "new"  # from the pending config
    assert lily.LilyConfig.from_pretrained(tmp_path).scaling == 0.25
    real_fsync_dir, calls = lily.io.fsync_dir, []

    def fsync_dir_fails_after_the_commit(directory):
        calls.append(directory)
        if len(calls) == 2:
            raise OSError("disk gone")
        real_fsync_dir(directory)

    with monkeypatch.context() as patch:  # the next save commits it first, then fails before its own renames
        patch.setattr("lily.io.fsync_dir", fsync_dir_fails_after_the_commit)
        with pytest.raises(OSError, match="disk gone"):
            lily.save_adapter(references["third"], tmp_path)
    assert which(tmp_path, references, tiny_llama) == "new"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(TEMP_PREFIX)]


def test_stale_temporaries_are_removed_and_files_get_default_modes(tmp_path):
    lily.save_adapter(llama_adapter(0, 0.5), tmp_path)
    for name in (f"{TEMP_PREFIX}{WEIGHTS_NAME}.dead.tmp", f"{TEMP_PREFIX}{CONFIG_NAME}.dead.tmp"):
        (tmp_path / name).write_bytes(b"left by a crash")
    umask = os.umask(0o027)
    try:
        lily.save_adapter(llama_adapter(1, 0.5), tmp_path)
    finally:
        os.umask(umask)
    assert sorted(os.listdir(tmp_path)) == [WEIGHTS_NAME, CONFIG_NAME]
    assert {(tmp_path / f).stat().st_mode & 0o777 for f in os.listdir(tmp_path)} == {0o640}


CHILD = textwrap.dedent(
    """
    import sys, torch, lily
    from torch import nn

    def adapter(value):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(4)])
        lily.inject(model, lily.LilyConfig(target_modules=r"\\d+", r=128, num_B=16, scaling=value / 4,
                                           routing="static"))
        with torch.no_grad():
            for param in lily.adapter_parameters(model).values():
                param.fill_(value)
        return model

    adapters = [adapter(1.0), adapter(2.0)]
    lily.save_adapter(adapters[0], sys.argv[1])
    print("ready", flush=True)
    i = 1
    while True:
        lily.save_adapter(adapters[i % 2], sys.argv[1])
        i += 1
    """
)


def test_a_killed_save_leaves_the_old_or_the_new_adapter(tmp_path):
    rng = random.Random(0)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    for _ in range(4):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, env=env)
        assert child.stdout.readline() == b"ready\n"
        try:
            child.wait(timeout=rng.uniform(0.05, 0.4))
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
        torch.manual_seed(0)
        model = lily.load_adapter(nn.Sequential(*[nn.Linear(512, 512) for _ in range(4)]), tmp_path)
        value = 4 * lily.get_adapter(model).config.scaling
        assert value in (1.0, 2.0)
        assert all(torch.all(p == value) for p in lily.adapter_parameters(model).values())  # config and weights agree
