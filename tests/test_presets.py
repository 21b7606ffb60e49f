"""Every preset in configs/ is valid for both `flwr run --run-config` and the in-process runner.

A preset that sets one of its strategy's own keys (``configs/abs.toml``: ``abs-mode``) runs in-process as it is,
and under ``flwr run`` too: Flower accepts only the keys of the app's ``[tool.flwr.app.config]``, which declares
every strategy's own keys for that reason (docs/design.md, "Declared keys").
"""

import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

from client_app.data import DatasetMissingError, load_dataset
from server_app.app import validate
from server_app.simulate import main as simulate_main
from server_app.simulate import merge_config, run_config_layers
from strategies import get_strategy, parse_config
from strategies.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted((ROOT / "configs").glob("*.toml"))


def test_there_are_presets():
    assert len(PRESETS) >= 5


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_is_valid(preset):
    cfg = parse_config(merge_config(str(preset)))  # a strategy's own hyperparameters declared, as a run does
    if cfg.dataset == "fashion-mnist":
        try:
            load_dataset("fashion-mnist", data_dir=cfg.data_dir)
        except DatasetMissingError:
            pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    validate(cfg)
    assert cfg.metrics_db == "", "presets must not pin a metrics store path"
    (own,) = run_config_layers(str(preset))
    assert set(own) - set(RunConfig().to_mapping()) <= set(get_strategy(cfg.strategy).hyperparameters)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_flower_accepts_what_make_run_passes_for_each_preset(preset, capsys):
    # make run: `simulate --check --print-run-config` prints the pinned keys; Flower fuses them into the app's
    # declared table and refuses any key the table lacks (flwr.common.config.fuse_dicts, the SuperLink's check).
    assert simulate_main(["--check", "--print-run-config", "--run-config", str(preset)]) == 0
    pinned = parse_config_args([capsys.readouterr().out.strip()])
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    fused = fuse_dicts(flatten_dict(table), pinned)
    cfg = parse_config(fused, lenient=True)  # what the ServerApp then parses
    assert cfg.to_mapping() == {**parse_config(merge_config(str(preset))).to_mapping(), "metrics-db": cfg.metrics_db}


def test_a_preset_runs_in_process(tmp_path, capsys):
    preset = next(p for p in PRESETS if p.stem == "edge-cellular")
    code = simulate_main(["--run-config", str(preset), "--nodes", "4", "--quiet", "--set", "max-updates=10",
                          "--set", "model='logreg'", "--set", f"metrics-db='{tmp_path / 'm.db'}'"])
    assert code == 0
    assert "stopped on max-updates" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "buffer-size=0"], "buffer-size = 0 is out of range"),
    (["--set", "batchsize=8"], "did you mean 'batch-size'"),
    (["--set", "strategy='fedsgd'"], "strategy = 'fedsgd' is unknown (did you mean 'fedavg'?); valid: abs, ad-psgd"),
    (["--run-config", "configs/nope.toml"], "run-config file not found"),
    (["--set", "oops"], "--set expects KEY=VALUE"),
    (["--clientapp", "no.such:app"], "cannot load 'no.such:app'"),
])
def test_cli_errors_exit_2_with_a_clear_message(args, message, capsys):
    assert simulate_main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "profiles='wifi=0.5,6g=0.5'"], "6g"),
    (["--set", "profile-file='/nonexistent.csv'"], "profile-file not found"),
    (["--set", "model='cnn9'"], "cnn9"),
    (["--set", "dataset='fashion-mnist'", "--set", "data-dir='/nonexistent'"], "apt-get install dataset-fashion-mnist"),
])
def test_bad_fleet_data_or_model_exit_2_before_training(args, message, capsys):
    assert simulate_main(args) == 2
    assert message in capsys.readouterr().err
