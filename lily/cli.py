"""The `lily` command: `lily train`, `lily recipe`, `lily eval`, `lily predict`.

Bad input ends with one line, `lily <command>: error: ...`, and exit code 2; Ctrl-C with one line,
`lily <command>: interrupted: ...` (what was kept and how to go on), and exit code 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

from lily.errors import LilyError

INTERRUPTED = 130
"""Exit code after Ctrl-C (128 + SIGINT), as shells report it."""
TRAIN_USAGE = "%(prog)s [--task TASK] [--model MODEL] [--data DATA] [--method METHOD] [--config FILE] [option ...]"
TRAIN_EXAMPLES = """examples:
  lily train                                   Lily on MiniLM + tweet sentiment (bundled, offline)
  lily train --method lora --output-dir out/lora
  lily train --task causal-lm --max-train-samples 256 --epochs 1
  lily train --config run.yaml --seed 1        YAML keys are option names; flags win"""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the usage of `lily train` alone is a screenful)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _quiet_tokenizers() -> None:
    """Tokenizers' thread pool warns when the DataLoader forks; we tokenize in the main process anyway."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_train(args: argparse.Namespace) -> None:
    from lily.train.config import config_from_args
    from lily.train.loop import train

    train(config_from_args(args))


def cmd_recipe(args: argparse.Namespace) -> None:
    from lily.recipes import defaults
    from lily.train.config import config_from_args
    from lily.train.loop import train

    train(config_from_args(args, base=defaults(args.recipe)))


def cmd_eval(args: argparse.Namespace) -> None:
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from lily.train.loop import evaluate
    from lily.train.runs import load_run

    task = load_run(args.run_dir)
    accelerator = Accelerator(cpu=args.cpu)
    loader = DataLoader(task.examples(args.split), batch_size=task.cfg.batch_size, collate_fn=task.collate)
    model, loader = accelerator.prepare(task.model, loader)
    score = evaluate(task, model, loader, accelerator, desc=f"scoring {args.split}")
    print(f"{args.split} {task.metric_name}: {score:.4f}")


def cmd_predict(args: argparse.Namespace) -> None:
    inputs = list(args.inputs)
    if args.input_file:
        inputs += [line for line in Path(args.input_file).read_text().splitlines() if line.strip()]
    if not inputs:
        raise LilyError("give inputs to predict on: texts, prompts or image paths, or --input-file.")
    from lily.train.runs import load_run

    task = load_run(args.run_dir)
    for text, prediction in zip(inputs, task.predict(task.model, inputs), strict=True):
        print(f"{text}\t{prediction}")


def build_parser() -> argparse.ArgumentParser:
    from lily.train.config import add_arguments

    parser = Parser(prog="lily", description="Lily: low-rank interconnected adaptation across layers.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train", help="fine-tune a model and evaluate it", usage=TRAIN_USAGE, epilog=TRAIN_EXAMPLES,
        description="Fine-tune a model with Lily (or a baseline), score the test split before and after, and\n"
        "write the adapter, metrics.json and plot.png to --output-dir.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_arguments(train)
    train.set_defaults(run=cmd_train)
    from lily.recipes import description, names

    recipe = commands.add_parser(
        "recipe", help="run one of the paper's experiments with its settings (any `lily train` flag overrides them)",
        description="\n".join(f"{name}: {description(name)}" for name in names()),
        usage="%(prog)s RECIPE [option ...]", formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    recipe.add_argument("recipe", choices=names(), help="the experiment")
    add_arguments(recipe)
    recipe.set_defaults(run=cmd_recipe)
    evaluate = commands.add_parser("eval", help="evaluate the adapter of a finished run")
    evaluate.add_argument("run_dir", help="the --output-dir of a finished `lily train` run")
    evaluate.add_argument("--split", default="test", choices=("train", "validation", "test"),
                          help="split to score (default: test)")  # fmt: skip
    evaluate.add_argument("--cpu", action="store_true", help="evaluate on the CPU even when a GPU is present")
    evaluate.set_defaults(run=cmd_eval)
    predict = commands.add_parser("predict", help="run the adapter of a finished run on new inputs")
    predict.add_argument("run_dir", help="the --output-dir of a finished `lily train` run")
    predict.add_argument("inputs", nargs="*", help="texts (text-cls), prompts (causal-lm) or image paths (image-cls)")
    predict.add_argument("--input-file", help="a file with one input per line")
    predict.set_defaults(run=cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_tokenizers()
    argv = sys.argv[1:] if argv is None else argv
    from lily.recipes import own_command

    if argv[:1] == ["recipe"] and len(argv) > 1 and (run := own_command(argv[1])):
        return run(argv[2:])  # a recipe with its own flags and loop (dreambooth-sdxl)
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except LilyError as exc:
        print(f"lily {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # lily.train's Interrupted says what was kept; a bare one says nothing
        print(f"lily {args.command}: interrupted{f': {exc}' if str(exc) else ''}", file=sys.stderr)
        return INTERRUPTED
    _close_process_group()  # not after an error: a peer that did not fail could never reach the barrier
    return 0


def _close_process_group() -> None:
    """Under torchrun, wait for every process and shut the process group down before exiting: a process that
    exits with a live gloo group while its peers still work can abort ("terminate called without an active
    exception")."""
    import torch.distributed as dist

    from lily.distributed import group_running

    if group_running():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
