"""Train options: the recipe that fits the weights, a TOML config file that flags override,
and TensorBoard logs."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("tensorflow")

from edgeclf.cli import build_parser, main  # noqa: E402
from edgeclf.commands.train import train_settings  # noqa: E402
from edgeclf.errors import InvalidInputError  # noqa: E402
from edgeclf.train.options import read_config  # noqa: E402
from edgeclf.train.trainer import RECIPES, TrainConfig, resolve_recipe  # noqa: E402
from tests.conftest import run_cli  # noqa: E402


def test_no_weights_switches_the_unset_options_to_the_from_scratch_recipe(capsys):
    resolved = resolve_recipe(TrainConfig("digits", "out", weights=None))
    assert {k: getattr(resolved, k) for k in RECIPES["from scratch"]} == RECIPES["from scratch"]
    notice = capsys.readouterr().err
    assert "from scratch" in notice and "unfreeze_at=0" in notice and len(notice.strip().splitlines()) == 1
    # What the user set is kept; the rest still follows the recipe.
    mixed = resolve_recipe(TrainConfig("digits", "out", weights=None, unfreeze_at=249, lr_finetune=1e-4))
    assert (mixed.unfreeze_at, mixed.lr_finetune, mixed.train_batchnorm) == (249, 1e-4, True)
    assert "(train_batchnorm=True)" in capsys.readouterr().err
    # Pretrained weights (or another bundle's): the fine-tuning recipe, silently.
    for cfg in (TrainConfig("digits", "out"), TrainConfig("digits", "out", weights=None, init_from="b")):
        resolved = resolve_recipe(cfg)
        assert (resolved.unfreeze_at, resolved.train_batchnorm, resolved.lr_finetune) == (None, False, 1e-5)
    assert capsys.readouterr().err == ""


def _settings(*argv: str) -> dict:
    return train_settings(build_parser().parse_args(["train", *argv]))


def test_config_file_with_flags_overriding_it(tmp_path):
    config = tmp_path / "train.toml"
    config.write_text('data = "photos"\nout = "runs/a"\nimage-size = [64, 96]\nlabels = "3..5"\n'
                      "epochs_frozen = 4\nlr-finetune = 3e-5\ntrain-batchnorm = true\nfeature-cache = false\n")
    settings = _settings("--config", str(config), "--epochs-frozen", "2", "--out", "runs/b", "--no-train-batchnorm")
    assert settings == {"data": "photos", "out": "runs/b", "image_size": (64, 96), "labels": [3, 4, 5],
                        "epochs_frozen": 2, "lr_finetune": 3e-5, "train_batchnorm": False,
                        "cache_features": False}
    # Options given nowhere stay unset, for TrainConfig's defaults and the recipe's.
    assert _settings("data", "--out", "o") == {"data": "data", "out": "o"}


@pytest.mark.parametrize("text,match", [
    ("epochs = 3\n", r"unknown key 'epochs' in the config file .*epochs-frozen"),
    ('epochs-frozen = "3"\n', r"'epochs-frozen' .* must be an integer. Received: '3'"),
    ("augment = 1\n", r"'augment' .* must be true or false"),
    ('labels = "3..x"\n', r"'labels' in the config file .*labels must be integers"),
    ("epochs-frozen = \n", r"is not valid TOML"),
])
def test_bad_config_files_name_the_key(tmp_path, text, match):
    config = tmp_path / "train.toml"
    config.write_text(text)
    with pytest.raises(InvalidInputError, match=match):
        read_config(config)


def test_cli_reports_an_unreadable_config_and_missing_data_on_one_line(capsys, tmp_path):
    assert main(["train", "--config", str(tmp_path / "missing.toml")]) == 1
    assert "cannot read the config file" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["train", "--out", str(tmp_path / "o")]) == 1
    assert "train needs DATA" in capsys.readouterr().err.strip().splitlines()[-1]


def test_tensorboard_needs_a_folder(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(InvalidInputError, match="needs a folder for the logs"):
        TrainConfig("digits", tmp_path / "out", tensorboard=tmp_path / "file").check()


@pytest.mark.slow  # a training run
def test_cli_trains_from_a_config_with_overrides_and_tensorboard_logs(noncontiguous_dir, tmp_path):
    config = tmp_path / "train.toml"
    config.write_text(f'data = "{noncontiguous_dir}"\nbackbone = "mobilenet_v3_small"\nimage-size = 32\n'
                      'weights = "none"\nepochs-frozen = 3\nepochs-finetune = 1\nseed = 7\n')
    out = tmp_path / "bundle"
    run = run_cli("train", "--config", str(config), "--out", str(out), "--epochs-frozen", "1",
                  "--tensorboard", str(tmp_path / "tb"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "training the whole backbone from scratch" in run.stderr
    settings = json.loads((out / "bundle.json").read_text())["training"]["settings"]
    # The file's values, the flag's override, and the recipe's for what neither set: all recorded.
    assert settings["seed"] == 7 and settings["epochs_frozen"] == 1 and settings["epochs_finetune"] == 1
    assert settings["recipe"] == "from scratch" and settings["unfreeze_at"] == 0
    assert settings["train_batchnorm"] is True and settings["lr_finetune"] == 1e-3
    for phase in ("frozen", "finetune"):
        assert list((tmp_path / "tb" / phase).rglob("events.out.tfevents.*")), phase


def test_every_train_option_is_declared_once_for_the_cli_the_config_file_and_trainconfig():
    import dataclasses

    from edgeclf.train.options import BY_FIELD, KEYS, OPTIONS

    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert [o.field for o in OPTIONS] == list(dict.fromkeys(o.field for o in OPTIONS))  # none twice
    assert set(BY_FIELD) == set(fields) - {"verbose"}  # the library's only extra: Keras' verbosity
    assert all(fields[f] == o.default for f, o in BY_FIELD.items() if f not in ("data", "out"))
    # The config keys are the flags' names; the command line's --resume has none.
    assert KEYS["val_dir"][0] == "val_data" and KEYS["feature_cache"][0] == "cache_features"
    assert "resume" not in KEYS and len(KEYS) == len(OPTIONS) - 1
    # Help texts show the declared defaults, and the recipes' for options a recipe decides.
    helps = {a.dest: a.help for a in next(a for a in build_parser()._actions if a.dest == "command")
             .choices["train"]._actions}
    assert helps["epochs_frozen"].endswith("(default 10)") and helps["lr_frozen"].endswith("(default 1e-3)")
    assert helps["lr_finetune"].endswith("(default 1e-5; 1e-3 with --weights none)")
    assert helps["unfreeze_at"].endswith("; 0 with --weights none)") and "(default 300)" in helps["peer_timeout"]
    assert helps["loss"].startswith("crossentropy (default): one-hot targets; ordinal: soft ordinal")
