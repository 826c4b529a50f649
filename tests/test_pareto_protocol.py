"""The Pareto study's tuning protocol (benchmarks/pareto.py): the lr grid grows until the validation-selected lr is
strictly inside it, only then do the other seeds run, and the plateau check picks the best LoRA and Lily by
validation."""

from benchmarks.pareto import ADAPTER_LRS, SEEDS, best_configs, grid, pending, selected_lr

LORA = {"method": "lora", "lora_r": 1}


def runs(label, scores, seed=0, method="lora"):
    return [{"label": label, "method": method, "lr": lr, "seed": seed, "val": v, "test": v,
             "config": {"label": label, "method": method}} for lr, v in scores.items()]  # fmt: skip


def test_a_new_configuration_starts_with_the_five_point_grid():
    assert pending({"a": LORA}, [], higher=True) == [("a", lr, 0) for lr in sorted(ADAPTER_LRS)]


def test_the_grid_grows_on_the_side_of_the_best_until_it_is_inside():
    rising = dict(zip(sorted(ADAPTER_LRS), (0.1, 0.2, 0.3, 0.4, 0.5), strict=True))  # best at the top end
    done = runs("a", rising)
    lrs, interior = grid("a", done, LORA, higher=True)
    assert not interior and lrs[-1] == 2 * max(ADAPTER_LRS)
    assert pending({"a": LORA}, done, higher=True) == [("a", 2 * max(ADAPTER_LRS), 0)]
    done += runs("a", {2 * max(ADAPTER_LRS): 0.45})  # worse: the optimum is now strictly inside
    lrs, interior = grid("a", done, LORA, higher=True)
    assert interior and len(lrs) == 6 and selected_lr("a", done, higher=True) == max(ADAPTER_LRS)
    assert pending({"a": LORA}, done, higher=True) == [("a", max(ADAPTER_LRS), s) for s in SEEDS[1:]]


def test_lower_is_better_grows_towards_smaller_lrs_for_perplexity():
    falling = dict(zip(sorted(ADAPTER_LRS), (10.0, 11.0, 12.0, 13.0, 14.0), strict=True))  # best at the bottom
    assert pending({"a": LORA}, runs("a", falling), higher=False) == [("a", min(ADAPTER_LRS) / 2, 0)]


def test_seeds_wait_for_an_interior_optimum_and_finished_runs_are_not_repeated():
    peak = dict(zip(sorted(ADAPTER_LRS), (0.1, 0.5, 0.3, 0.2, 0.1), strict=True))
    done = runs("a", peak) + runs("a", {sorted(ADAPTER_LRS)[1]: 0.4}, seed=1)
    assert pending({"a": LORA}, done, higher=True) == [("a", sorted(ADAPTER_LRS)[1], 2)]


def test_the_plateau_check_takes_the_best_lora_and_lily_by_validation():
    lrs = sorted(ADAPTER_LRS)
    done = (runs("lora r=1", dict(zip(lrs, (0.1, 0.6, 0.3, 0.2, 0.1), strict=True)))
            + runs("lora r=4", dict(zip(lrs, (0.1, 0.2, 0.7, 0.2, 0.1), strict=True)))
            + runs("lily", dict(zip(lrs, (0.1, 0.2, 0.3, 0.5, 0.1), strict=True)), method="lily"))  # fmt: skip
    entry = {"higher_is_better": True, "runs": [{k: v for k, v in r.items() if k != "label"} for r in done]}
    picked = best_configs(entry)
    assert {label: lr for label, (_, lr) in picked.items()} == {"lora r=4": lrs[2], "lily": lrs[3]}
    assert picked["lily"][0] == {"method": "lily"}
    entry["higher_is_better"] = False  # as perplexities: the lowest validation wins
    assert {label: lr for label, (_, lr) in best_configs(entry).items()} == {"lora r=1": lrs[0], "lily": lrs[0]}
