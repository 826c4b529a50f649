"""Fine-tune real models with Lily (or a baseline) and evaluate them: the engine behind `lily train`.

From a notebook::

    from lily.train import TrainConfig, train
    metrics = train(TrainConfig(task="text-cls", method="lily", epochs=2, output_dir="out/tweets"))
"""

from lily.train.config import TrainConfig
from lily.train.loop import train
from lily.train.runs import load_run

__all__ = ["TrainConfig", "load_run", "train"]
