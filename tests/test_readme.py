"""The README's Python examples run as written."""

import re
from pathlib import Path

from tests.helpers import tiny_llama

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_three_line_usage_runs_on_a_model(capsys):
    three_lines = python_blocks()[0]
    assert len(three_lines.strip().splitlines()) == 3
    exec(compile(three_lines, "README usage", "exec"), {"model": tiny_llama()})
    assert "trainable adapter parameters" in capsys.readouterr().out


def test_complete_script_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(python_blocks()[1], "README script", "exec"), {})
    assert (tmp_path / "out" / "adapter" / "lily_adapter.safetensors").is_file()


def test_benchmark_commands_name_importable_modules():
    import importlib

    modules = set(re.findall(r"python -m (benchmarks\.\w+)", README.read_text()))
    assert modules, "the README names no benchmark command"
    for name in modules:
        assert callable(importlib.import_module(name).main), name


def test_several_adapters_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    block = next(b for b in python_blocks() if "set_adapter" in b)
    exec(compile(block, "README adapters", "exec"), {})
    assert "['chat', 'code'] code" in capsys.readouterr().out
    assert (tmp_path / "out" / "code" / "lily_config.json").is_file()


def test_transformers_workflow_example_runs(tmp_path, monkeypatch):
    import huggingface_hub

    pushed = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            pass

        def upload_folder(self, repo_id, folder_path, revision=None, commit_message=None):
            pushed.append((repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.chdir(tmp_path)
    block = next(b for b in python_blocks() if "transformers.Trainer(" in b)
    exec(compile(block, "README transformers", "exec"), {})
    assert pushed == [("your-name/lily-bert", ["README.md", "lily_adapter.safetensors", "lily_config.json"])]
    checkpoint = tmp_path / "out" / "trainer" / "checkpoint-4"
    assert (checkpoint / "lily_adapter.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    assert (tmp_path / "out" / "merged" / "config.json").is_file()
