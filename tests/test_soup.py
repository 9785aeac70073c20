"""``rlweights soup`` (issue 6): plain state_dicts, training checkpoints, SB3 zips, and
every refusal (exit 2, no output file, no code run)."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from conftest import cnn_bn, mlp
from torch.testing import assert_close

from rlweights.cli import main


def save(tmp_path, name, state):
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_weighted_average_of_state_dicts_matches_float64(tmp_path, capsys):
    nets = [cnn_bn(i) for i in range(3)]
    paths = [save(tmp_path, f"{i}.pt", n.state_dict()) for i, n in enumerate(nets)]
    out = tmp_path / "soup.pt"
    args = ["--out", str(out), "--coefficients", "1", "2", "1"]
    assert main(["soup", *map(str, paths), *args]) == 0
    got = torch.load(out, weights_only=True)
    for key, value in nets[0].state_dict().items():
        if value.is_floating_point():
            want = (
                sum(w * n.state_dict()[key].double() for w, n in zip((1, 2, 1), nets, strict=True))
                / 4
            )
            assert_close(got[key].double(), want, rtol=1e-6, atol=1e-7)
        else:  # num_batches_tracked: copied from the first
            assert torch.equal(got[key], value)
    assert "wrote the average of 3 state_dict checkpoints" in capsys.readouterr().out


def test_huge_coefficients_are_normalised_without_overflow(tmp_path):
    """Issue 13: 1e308 + 1e308 overflows; the mean must come out, not zeros."""
    nets = [mlp(i) for i in range(2)]
    paths = [save(tmp_path, f"{i}.pt", n.state_dict()) for i, n in enumerate(nets)]
    out = tmp_path / "soup.pt"
    args = ["--out", str(out), "--coefficients", "1e308", "1e308"]
    assert main(["soup", *map(str, paths), *args]) == 0
    got = torch.load(out, weights_only=True)
    for key, value in nets[0].state_dict().items():
        want = (value.double() + nets[1].state_dict()[key].double()) / 2
        assert_close(got[key].double(), want, rtol=1e-6, atol=1e-7)


def test_average_of_training_checkpoints_evaluates(tmp_path, capsys):
    from rlweights.agents.registry import make_config
    from rlweights.agents.train import train

    runs = []
    for seed in (0, 1):
        config = make_config(
            "dqn",
            total_steps=120,
            learning_starts=20,
            hidden=(8,),
            train_freq=4,
            gradient_steps=1,
            eval_episodes=1,
            seed=seed,
        )
        train(config, tmp_path / f"r{seed}")
        runs.append(tmp_path / f"r{seed}" / "model.pt")
    out = tmp_path / "soup" / "model.pt"
    assert main(["soup", *map(str, runs), "--out", str(out)]) == 0
    soup = torch.load(out, weights_only=True)
    a, b = (torch.load(r, weights_only=True)["weights"] for r in runs)
    for net in a:
        for key in a[net]:
            assert_close(soup["weights"][net][key], (a[net][key] + b[net][key]) / 2)
    assert "training" not in soup and soup["averaged_from"] == [str(r) for r in runs]
    capsys.readouterr()
    assert main(["evaluate", str(out), "--episodes", "1"]) == 0
    # Issue 13: --out equal to an input replaced a run's resumable checkpoint, and --resume
    # of an average ended in a KeyError traceback.
    original = runs[0].read_bytes()
    for same in (runs[0], runs[0].parent / ".." / "r0" / "model.pt"):
        assert main(["soup", *map(str, runs), "--out", str(same)]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line == (
            f"rlweights soup: error: --out {same} is one of the checkpoints to average: "
            "writing there would replace it; give another path"
        )
    assert runs[0].read_bytes() == original
    assert main(["train", "--resume", str(out.parent), "--steps", "200"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith(
        "is an average of checkpoints without training state (optimizers, replay buffer): it "
        "evaluates, but does not resume; start a new run"
    )


def test_average_of_sb3_models_loads_in_sb3(tmp_path):
    from stable_baselines3 import DQN

    paths = []
    for seed in (0, 1):
        model = DQN("MlpPolicy", "CartPole-v1", policy_kwargs={"net_arch": [8]}, seed=seed)
        model.save(tmp_path / f"m{seed}.zip")
        paths.append(tmp_path / f"m{seed}.zip")
    out = tmp_path / "soup.zip"
    out.write_bytes(b"an older soup")
    out.chmod(0o600)
    mask = os.umask(0o022)
    try:
        assert main(["soup", *map(str, paths), "--out", str(out)]) == 0
    finally:
        os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # issue 13: the umask, like any tool
    soup = DQN.load(out)
    m0, m1 = DQN.load(paths[0]), DQN.load(paths[1])
    for key, value in soup.policy.state_dict().items():
        assert_close(value, (m0.policy.state_dict()[key] + m1.policy.state_dict()[key]) / 2)


class _Exploit:
    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_refusals_exit_2_and_write_nothing(tmp_path, capsys):
    a = save(tmp_path, "a.pt", mlp(0).state_dict())
    b = save(tmp_path, "b.pt", mlp(1).state_dict())
    other = save(tmp_path, "other.pt", cnn_bn(0).state_dict())
    exploit = _Exploit()
    exploit.marker = str(tmp_path / "pwned")
    evil = save(tmp_path, "evil.pt", {"w": exploit})
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    out = tmp_path / "out.pt"
    cases = [
        ([a, other], [], "hold different tensors"),
        ([a, b], ["--coefficients", "1"], "1 coefficients for 2 checkpoints"),
        ([a, b], ["--coefficients", "1", "-1"], "coefficients[1] must be a finite number >= 0"),
        ([a], [], "at least two checkpoints"),
        ([a, evil], [], "not a readable checkpoint (Weights only load failed)"),
        ([a, corrupt], [], "not a readable checkpoint"),
        ([a, tmp_path / "missing.pt"], [], "no file at"),
    ]
    for files, extra, message in cases:
        code = main(["soup", *map(str, files), "--out", str(out), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, (files, err)
        assert err[0].startswith("rlweights soup: error: ") and message in err[0], err
        assert not out.exists()
    assert not (tmp_path / "pwned").exists()


def _dqn_run(folder, env_id, seed):
    from rlweights.agents.registry import make_config
    from rlweights.agents.train import train

    config = make_config(
        "dqn",
        env_id,
        total_steps=60,
        learning_starts=20,
        hidden=(8,),
        train_freq=4,
        gradient_steps=1,
        eval_every=0,
        eval_episodes=1,
        seed=seed,
    )
    train(config, folder)
    return folder


@pytest.mark.filterwarnings("ignore:.*CartPole-v0 is out of date")
def test_average_takes_run_folders_refuses_other_environments_and_other_runs(tmp_path, capsys):
    r0 = _dqn_run(tmp_path / "r0", "CartPole-v1", 0)
    r1 = _dqn_run(tmp_path / "r1", "CartPole-v1", 1)
    v0 = _dqn_run(tmp_path / "v0", "CartPole-v0", 2)  # the same spaces: the weights fit
    files = {run: (run / "model.pt").read_bytes() for run in (r0, r1, v0)}
    # run folders, as 'evaluate' and 'train --resume' take them
    out = tmp_path / "soup.pt"
    assert main(["soup", str(r0), str(r1), "--out", str(out)]) == 0
    soup = torch.load(out, weights_only=True)
    a, b = (torch.load(r / "model.pt", weights_only=True)["weights"] for r in (r0, r1))
    for net in a:
        for key in a[net]:
            assert_close(soup["weights"][net][key], (a[net][key] + b[net][key]) / 2)
    capsys.readouterr()
    assert main(["evaluate", str(out), "--episodes", "1"]) == 0
    capsys.readouterr()
    refusals = [
        (
            [r0, v0],
            [],
            f"the checkpoints come from different environments: CartPole-v1 ({r0 / 'model.pt'})"
            f" and CartPole-v0 ({v0 / 'model.pt'}); average runs of one environment",
        ),
        ([r0, r1], ["--out", str(v0 / "model.pt")], f"is in the run folder {v0}"),
        ([r0, r1], ["--out", str(v0 / "soup.pt")], f"is in the run folder {v0}"),
        ([r0, r1], ["--out", str(r1)], "is a directory"),
        ([r0, tmp_path / "nowhere"], ["--out", str(tmp_path / "x.pt")], "no file at"),
    ]
    for inputs, extra, says in refusals:
        extra = extra or ["--out", str(tmp_path / "other.pt")]
        code = main(["soup", *map(str, inputs), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert says in err[0], err
        assert not (tmp_path / "other.pt").exists() and not (v0 / "soup.pt").exists()
    assert {run: (run / "model.pt").read_bytes() for run in (r0, r1, v0)} == files
    # an input is never replaced, even with --force
    assert main(["soup", str(r0), str(r1), "--out", str(r0 / "model.pt"), "--force"]) == 2
    assert "one of the checkpoints to average" in capsys.readouterr().err
    # --force: the user means it
    assert main(["soup", str(r0), str(r1), "--out", str(v0 / "model.pt"), "--force"]) == 0
    forced = torch.load(v0 / "model.pt", weights_only=True)["weights"]
    assert all(torch.equal(forced[n][k], v) for n in forced for k, v in soup["weights"][n].items())


def test_a_mismatch_is_said_in_the_command_s_terms(tmp_path, capsys):
    a = save(tmp_path, "a.pt", mlp(0).state_dict())
    other = save(tmp_path, "other.pt", cnn_bn(0).state_dict())
    wide = mlp(1).state_dict()
    wide["0.weight"] = torch.zeros(3, 5)
    wide = save(tmp_path, "wide.pt", wide)
    cases = [
        (other, f"{a} and {other} hold different tensors (only in {a}: '2.weight', '2.bias'; "),
        (wide, f"{a} and {wide} do not fit together: '0.weight' shape (16, 5) vs (3, 5)"),
    ]
    for second, says in cases:
        assert main(["soup", str(a), str(second), "--out", str(tmp_path / "s.pt")]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert says in line, line
        assert line.endswith("average checkpoints of one architecture")
        assert "include=" not in line and "exclude=" not in line
