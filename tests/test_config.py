"""LilyConfig validates every field at construction and names the field at fault."""

import pytest

from lily import ConfigError, LilyConfig


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"r": 0}, "r"),
        ({"r": -3}, "r"),
        ({"r": 2.5}, "r"),
        ({"num_B": 0}, "num_B"),
        ({"num_A": 0}, "num_A"),
        ({"layers_per_A": 0}, "layers_per_A"),
        ({"num_A": 2, "layers_per_A": 3}, "not both"),
        ({"routing": "topk"}, "routing"),
        ({"dropout": 1.0}, "dropout"),
        ({"scaling": float("nan")}, "scaling"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": "q_proj("}, "regex"),
    ],
)
def test_bad_field_raises_named_error(kwargs, field):
    kwargs = {"target_modules": ["q_proj"], **kwargs}
    with pytest.raises(ConfigError, match=field):
        LilyConfig(**kwargs)


def test_unknown_routing_lists_the_modes():
    with pytest.raises(ConfigError, match="'batch', 'sample', 'token', 'static', 'uniform'"):
        LilyConfig(target_modules=["q"], routing="softmax")


def test_defaults_and_round_trip():
    cfg = LilyConfig(target_modules=("q_proj", "v_proj"))
    assert (cfg.r, cfg.num_A, cfg.layers_per_A, cfg.num_B, cfg.scaling, cfg.routing) == (32, 2, None, 4, 1.0, None)
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert LilyConfig.from_dict(cfg.to_dict()) == cfg
    by_stride = LilyConfig(target_modules=["q"], layers_per_A=3)
    assert by_stride.num_A is None and LilyConfig.from_dict(by_stride.to_dict()) == by_stride


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ConfigError, match="stride_A"):
        LilyConfig.from_dict({"target_modules": ["q"], "stride_A": 2})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 65537}, "r=65537 is above 65536"),
        ({"num_B": 4097}, "num_B=4097 is above 4096"),
        ({"num_A": 65537}, "num_A=65537 is above 65536"),
        ({"layers_per_A": 100000}, "layers_per_A=100000 is above 65536"),
        ({"parallel_modules": ["mlp"], "parallel_r": 70000}, "parallel_r=70000 is above 65536"),
        ({"trainable_modules": None}, "trainable_modules must be a list"),
        ({"trainable_modules": ["classifier", None]}, "trainable_modules must be a list"),
        ({"parallel_modules": None}, "parallel_modules must be a list"),
        ({"target_modules": {"q_proj", None}}, "target_modules must be a list"),
        ({"target_modules": ""}, "target_modules is an empty regex"),
        ({"dropout": False}, "dropout"),
    ],
)
def test_typos_and_wrong_types_raise_a_named_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LilyConfig(**{"target_modules": ["q_proj"], **kwargs})


def test_from_dict_names_missing_fields_and_refuses_non_mappings():
    with pytest.raises(ConfigError, match=r"lacks the required field\(s\) \['target_modules'\]"):
        LilyConfig.from_dict({"r": 4})
    with pytest.raises(ConfigError, match="mapping of fields, got list"):
        LilyConfig.from_dict(["q_proj"])
