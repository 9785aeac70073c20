"""The native agents' configs: each setting written once (its field, default, rule, flag, help
and SB3 name), and what is generated from it: the flags of ``rlweights train``, the checks,
the SB3 constructor arguments."""

from __future__ import annotations

import dataclasses

import pytest

from rlweights.agents import cli
from rlweights.agents.config import setting_of
from rlweights.agents.registry import ALGOS, make_config
from rlweights.cli import build_parser, main

# A valid value for each flag that differs from every algorithm's default, and the other flags
# a value needs (shrink-and-perturb needs its interval, the layers a schedule).
VALUES = {
    "total_steps": (1234, []),
    "num_envs": (3, []),
    "buffer_size": (777, []),
    "batch_size": (17, []),
    "learning_starts": (5, []),
    "gamma": (0.5, []),
    "learning_rate": (0.25, []),
    "hidden": ((7, 5), []),
    "train_freq": (3, []),
    "gradient_steps": (4, []),
    "target_update": ("hard:3", []),
    "policy_ema": (0.5, []),
    "weight_clip": (0.5, []),
    "max_norm": (0.5, []),
    "drift_every": (9, []),
    "eval_every": (11, []),
    "eval_episodes": (2, []),
    "average_every": (13, []),
    "peer_timeout": (14, []),
    "reset_every": (15, []),
    "reset_layers": ("*.weight", ["--reset-every", "15"]),
    "shrink_perturb": ((0.5, 0.25), ["--sp-every", "16"]),
    "sp_every": (16, ["--shrink-perturb", "0.5,0.25"]),
    "unit_sphere": ("*.weight", []),
    "exploration_fraction": (0.5, []),
    "exploration_initial_eps": (0.5, []),
    "exploration_final_eps": (0.5, []),
    "max_grad_norm": (0.5, []),
    "ent_coef": (0.5, []),
    "use_sde": (True, []),
    "log_std_init": (0.5, []),
    "sde_sample_freq": (3, []),
    "policy_delay": (3, []),
    "target_policy_noise": (0.5, []),
    "target_noise_clip": (0.25, []),
    "exploration_noise": (0.5, []),
    "n_critics": (3, []),
    "n_quantiles": (7, []),
    "top_quantiles_to_drop_per_net": (3, []),
    "dropout": (0.5, []),
    "layer_norm": (False, []),
}


def _parse(*argv: str):
    return build_parser("train").parse_args(["train", *argv])


def _text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def test_every_field_with_a_help_text_is_a_flag_that_sets_it():
    helped = {
        field.name
        for cls, _ in ALGOS.values()
        for field in dataclasses.fields(cls)
        if setting_of(cls, field.name).get("help")
    }
    assert {flag.field for flag in cli.FLAGS} == helped == set(VALUES)
    for flag in cli.FLAGS:
        value, needs = VALUES[flag.field]
        for algo in ALGOS:
            argv = [flag.flag, _text(value)]
            if isinstance(value, bool):  # --use-sde, --no-layer-norm
                argv = [flag.flag if value else f"--no-{flag.flag[2:]}"]
            args = _parse("--algo", algo, *argv, *needs)
            if algo not in flag.algos:
                with pytest.raises(cli.UsageError, match=f"{flag.flag} is a setting of "):
                    cli._checked_config(args, 0, "cpu")
                continue
            config, _ = cli._checked_config(args, 0, "cpu")
            assert getattr(config, flag.field) == value, (flag.flag, algo)
            assert getattr(make_config(algo), flag.field) != value, (flag.flag, algo)
            # --seeds passes the same flags on to each seed's run
            assert flag.as_argument(value) in cli._child_arguments(args)


def test_a_flag_of_another_algorithm_is_one_line(capsys):
    assert main(["train", "--algo", "sac", "--policy-delay", "3", "--steps", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    want = "rlweights train: error: --policy-delay is a setting of td3 and droq, not of sac"
    assert err == [want], err


def test_a_rule_of_a_setting_names_the_value():
    for field, bad in (("gamma", 1.5), ("batch_size", 0), ("policy_delay", 0), ("ent_coef", -1.0)):
        algo = next(a for a, (cls, _) in ALGOS.items() if field in cls.__dataclass_fields__)
        with pytest.raises(ValueError, match=f"impossible values: {field}={bad!r}"):
            make_config(algo, **{field: bad})


def test_help_lists_the_flags_in_sections(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    out = out[out.index("options:") :]  # past the usage line, which lists every flag
    sections = [
        "run and output:",
        "algorithm and hyperparameters",
        "weight operations:",
        "plasticity:",
        "several seeds and parallel learners:",
        "speed:",
    ]
    at = [out.index(section) for section in sections]
    assert at == sorted(at)
    assert out.index("--policy-ema ") > out.index("weight operations:") > out.index("--gamma ")


def test_sb3_names_reach_sb3s_own_attributes():
    """Every field that names an SB3 argument arrives in SB3's model under that name (DroQ's,
    which SB3 lacks, in SBX's)."""
    pytest.importorskip("stable_baselines3")
    pytest.importorskip("sbx")
    from rlweights.agents.sb3_train import build_sb3_model
    from rlweights.agents.sbx_train import build_sbx_model

    for algo, (cls, _) in ALGOS.items():
        named = {
            field.name: setting_of(cls, field.name)["sb3"]
            for field in dataclasses.fields(cls)
            if setting_of(cls, field.name).get("sb3") and field.name != "device"
        }
        changed = {
            name: VALUES[name][0] if name in VALUES else 7
            for name in named
            if name not in ("use_sde", "sde_sample_freq", "seed")
        }
        config = make_config(algo, total_steps=1000, **changed)
        if algo == "droq":  # its own settings (SAC's reach SB3's SAC above)
            sac = {field.name for field in dataclasses.fields(ALGOS["sac"][0])}
            changed = {name: value for name, value in changed.items() if name not in sac}
            assert changed
            model = build_sbx_model(config)
        else:
            model, attachment = build_sb3_model(config)
            attachment.detach()
        for name, value in changed.items():
            *within, attribute = named[name].split(".")  # "policy_kwargs.n_critics"
            got = model
            for key in within:
                got = getattr(got, key)
            got = got[attribute] if within else getattr(got, attribute)
            got = got(1.0) if callable(got) else got  # SB3 keeps a schedule of the rate
            assert got == pytest.approx(value), (algo, name, got, value)
        model.get_env().close()
