"""The config system: presets, files, overrides, errors that name the field."""

from __future__ import annotations

import pytest

from rstar.cli import main
from rstar.config import ConfigError, describe, list_presets, load_config


def test_presets_mirror_the_papers_rounds():
    assert {"round1", "round2", "round3", "round4", "eval"} <= set(list_presets())
    r1, r2, r3, r4 = (load_config(f"round{i}").search for i in range(1, 5))
    assert (r1.rollouts, r1.error_threshold, r1.ppm_init, r1.prompt_style) == (8, 2, False, "fewshot")
    assert (r2.rollouts, r2.error_threshold, r2.ppm_init) == (16, 1, False)
    assert r3.ppm_init and r4.ppm_init and r3.rollouts == 16  # `base: round2` inherited
    ev = load_config("eval").search
    assert not ev.terminal_guided


def test_file_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("base: round3\nsearch:\n  rollouts: 32\nppm:\n  learning_rate: 1e-4\n")
    cfg = load_config(config_file=f, overrides=["search.c_puct=1.5", "search.unvisited=zero", "ppm.epochs=3"])
    assert cfg.search.rollouts == 32 and cfg.search.ppm_init  # file over its base preset
    assert cfg.search.c_puct == 1.5 and cfg.search.unvisited == "zero"
    assert cfg.ppm.learning_rate == 1e-4 and cfg.ppm.epochs == 3.0
    assert cfg.ppm.batch_size == 512  # the section's own default survives a sibling override


@pytest.mark.parametrize(
    "override,message",
    [
        ("search.rollouts=abc", "search.rollouts='abc': expected a number"),
        ("search.rollouts=2.5", "expected an integer"),
        ("search.foo=1", "search.foo"),
        ("search.mode=dfs", "search.mode='dfs'"),
        ("search.ppm_init=maybe", "expected true or false"),
        ("rollouts", "expected section.field=value"),
        ("evolve.ppm_pair_rounds=-1", "evolve.ppm_pair_rounds=-1: expected 0 (all rounds) or more"),
        ("evolve.sft_seed_records=-3", "evolve.sft_seed_records=-3"),
        ("evolve.search_actors=-1", "evolve.search_actors=-1: expected 0 (this process) or more"),
        ("evolve.train_per_level=[5, -1]", "evolve.train_per_level=.*: expected one count >= 0"),
        ("evolve.test_per_level=[]", "evolve.test_per_level=.*: expected one count"),
        ("sft.sampling=by_length", "sft.sampling='by_length': expected random | group_by_length"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(overrides=[override])


def test_every_field_is_documented():
    for name, _, help_ in describe(load_config()):
        assert help_, f"{name} has no help"


def test_config_show_cli(capsys):
    assert main(["config", "show", "--preset", "round1", "--set", "search.rollouts=3"]) == 0
    out = capsys.readouterr().out
    assert "search.rollouts = 3" in out and "consecutive code errors" in out
    assert main(["config", "show", "--set", "search.rollouts=x"]) == 2
    assert "search.rollouts" in capsys.readouterr().err


def test_per_level_counts_one_for_all_or_one_each():
    from rstar import RstarError
    from rstar.data.world import per_level

    assert load_config(overrides=["evolve.train_per_level=7"]).evolve.train_per_level == [7]
    assert per_level([7], 4, "x") == {1: 7, 2: 7, 3: 7, 4: 7}
    assert per_level([1, 2, 3, 4], 4, "x") == {1: 1, 2: 2, 3: 3, 4: 4}
    with pytest.raises(RstarError, match=r"evolve.train_per_level: expected one count or 4"):
        per_level([1, 2], 4, "evolve.train_per_level")
