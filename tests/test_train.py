"""The training loop, checkpoints, resume and the ``rlweights train`` / ``evaluate`` commands,
with tiny budgets (the learning goals are in test_learning.py, marked slow)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import SUBPROCESS_TIMEOUT

from rlweights.agents import run_folder
from rlweights.agents.checkpoint import load_checkpoint
from rlweights.agents.registry import make_config
from rlweights.agents.train import train
from rlweights.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = {"hidden": (16, 16), "batch_size": 32, "learning_starts": 50, "eval_episodes": 2}
TINY_DQN = TINY | {"train_freq": 4, "gradient_steps": 2}
TINY_FLAGS = ["--hidden", "16,16", "--batch-size", "32", "--learning-starts", "50"]
TINY_FLAGS += ["--eval-episodes", "2", "--no-progress"]


def tiny(algo: str, **overrides):
    return make_config(algo, **((TINY_DQN if algo == "dqn" else TINY) | overrides))


def weights(agent) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value
        for name, state in agent.weights_state().items()
        for key, value in state.items()
    }


@pytest.mark.parametrize("algo", ["dqn", "sac", "td3", "ddpg", "tqc", "droq"])
def test_same_seed_same_run(algo):
    a, summary = train(tiny(algo, total_steps=150, seed=3))
    b, _ = train(tiny(algo, total_steps=150, seed=3))
    c, _ = train(tiny(algo, total_steps=150, seed=4))
    wa, wb, wc = weights(a), weights(b), weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert summary["steps"] == 150 and summary["gradient_updates"] > 0
    assert summary["eval_episodes"] == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("algo", ["dqn", "sac", "td3"])
def test_native_agents_train_on_cuda(tmp_path, algo):
    agent, summary = train(tiny(algo, total_steps=300, device="cuda", policy_ema=0.1), tmp_path)
    assert summary["steps"] == 300 and summary["gradient_updates"] > 0
    for net in agent.networks.values():
        assert all(p.is_cuda for p in net.parameters())
    assert load_checkpoint(tmp_path)["steps"] == 300  # saved from CUDA, loaded on the CPU


def test_vector_envs_count_steps_over_all_environments():
    _, summary = train(tiny("sac", total_steps=400, num_envs=2))
    assert summary["steps"] == 400 and summary["episodes"] == 2  # 200 steps in each env
    assert summary["gradient_updates"] == (400 - 50) // 2


def test_run_directory_events_checkpoint_and_summary(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny("sac", total_steps=400, drift_every=100, eval_every=200, policy_ema=0.05)
    agent, summary = train(config, tmp_path)
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    for tag in (
        "charts/episodic_return",
        "losses/critic_loss",
        "eval/return",
        "eval/ema_return",
        "drift/critic/target_distance",
        "drift/actor/layers/mean.weight/update_ratio",
    ):
        assert tag in scalars, tag
    assert [e.step for e in events.Scalars("drift/critic/target_distance")] == [100, 200, 300, 400]
    assert [e.step for e in events.Scalars("eval/return")] == [200, 400]
    first = events.Scalars("charts/episodic_return")[0]
    assert first.step == 200  # logged at the environment step that ended the episode
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved == pytest.approx(summary)
    for key in ("final_eval_return", "eval_episodes", "steps", "steps_per_second", "wall_seconds"):
        assert key in saved
    assert events.Scalars("eval/return")[-1].value == pytest.approx(saved["final_eval_return"])
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert state["format"] == "rlweights-agent" and state["steps"] == 400
    for name, net in agent.networks.items():
        for key, value in net.state_dict().items():
            assert torch.equal(state["weights"][name][key], value)
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries


def _interrupted_at(step, config, run_dir):
    """Train ``config`` into ``run_dir`` and press Ctrl-C (SIGINT) at ``step``."""

    def interrupt(steps, info):
        if steps == step:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(config, run_dir, progress=interrupt)


def test_ctrl_c_checkpoints_and_resume_loses_nothing(tmp_path):
    """Interrupt at step 250, then resume up to step 350 (learning starts at 400, so the
    resumed run changes no weight): weights, replay transitions and episodes all survive."""
    config = tiny("td3", total_steps=500, learning_starts=400, eval_every=0, policy_ema=0.1)
    _interrupted_at(250, config, tmp_path)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    saved = load_checkpoint(tmp_path)
    assert saved["steps"] == 250  # stopped before the next step
    assert not (tmp_path / "summary.json").exists()
    agent, summary = train(dataclasses.replace(config, total_steps=350), tmp_path, resume=True)
    assert summary["steps"] == 350
    assert summary["episodes"] == 1  # the episode that ended before the interruption is kept
    for name, state in saved["weights"].items():
        for key, value in state.items():
            assert torch.equal(agent.networks[name].state_dict()[key], value), f"{name}.{key}"
    final = load_checkpoint(tmp_path)
    assert final["training"]["buffer"]["size"] == 350
    assert torch.equal(final["training"]["buffer"]["obs"][:250], saved["training"]["buffer"]["obs"])


def test_a_resumed_run_keeps_the_evaluation_of_its_checkpoint_step(tmp_path):
    """Stopped right after its evaluation at step 200: TensorBoard's reader still shows that
    evaluation after the resumed run writes its own events (it once purged it)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny("td3", total_steps=300, learning_starts=400, eval_every=100, eval_episodes=1)
    _interrupted_at(200, config, tmp_path)
    assert load_checkpoint(tmp_path)["steps"] == 200
    train(config, tmp_path, resume=True)
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("eval/return")] == [100, 200, 300]


def test_a_resumed_runs_event_file_sorts_after_the_earlier_ones(tmp_path):
    """TensorBoard reads a folder's event files in name order, and a name begins with the
    second the file was made (then host, process, a counter that can go from 9 to 10): a run
    resumed in the same second and process could sort first. A resumed run opens its file
    after the newest file's second."""
    from torch.utils.tensorboard import SummaryWriter

    from rlweights.agents.run import Run

    newest = int(time.time()) + 1  # made "later this second": the clock has not passed it
    (tmp_path / f"events.out.tfevents.{newest:010d}.host.1.9").write_bytes(b"")
    Run(tiny("sac"), tmp_path, None).after_earlier_events()
    writer = SummaryWriter(str(tmp_path))
    writer.close()
    names = sorted(p.name for p in tmp_path.glob("events.out.tfevents.*"))
    assert len(names) == 2 and int(names[-1].split(".")[3]) > newest  # the new file, last


def test_resume_restores_optimizers_routines_and_counters(tmp_path):
    config = tiny("sac", total_steps=200, eval_every=0, policy_ema=0.2)
    agent, _ = train(config, tmp_path)
    saved = load_checkpoint(tmp_path)
    fresh = sys.modules["rlweights.agents.registry"].build_agent(config, _envs(config))
    fresh.load_weights(saved["weights"])
    fresh.load_training_state(saved["training"]["agent"])
    for name, opt in agent.optimizers.items():
        a, b = opt.state_dict(), fresh.optimizers[name].state_dict()
        for key in a["state"]:
            for field, value in a["state"][key].items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][key][field]))
    assert fresh.target_routine.state_dict() == agent.target_routine.state_dict()
    assert fresh.ema_routine.updates == agent.ema_routine.updates == 150
    assert fresh.gradient_updates == agent.gradient_updates
    assert torch.equal(fresh.log_alpha, agent.log_alpha)


def _envs(config):
    from rlweights.agents.environments import make_envs

    return make_envs(config.env_id, 1)


@pytest.mark.parametrize(
    ("algo", "flags"),
    [
        ("sac", ["--policy-ema", "0.05", "--weight-clip", "0.5", "--num-envs", "2"]),
        ("sac", ["--target-update", "hard:20", "--max-norm", "2"]),
        ("td3", ["--policy-ema", "0.1", "--target-update", "hard:3", "--weight-clip", "1"]),
        ("td3", ["--max-norm", "1.5", "--num-envs", "2", "--drift-every", "50"]),
        ("ddpg", ["--policy-ema", "0.1", "--target-update", "hard:3", "--weight-clip", "1"]),
        (
            "tqc",
            ["--policy-ema", "0.1", "--n-critics", "3", "--n-quantiles", "5", "--max-norm", "2"],
        ),
        ("droq", ["--policy-ema", "0.1", "--gradient-steps", "3", "--policy-delay", "2"]),
        ("dqn", ["--policy-ema", "0.2", "--target-update", "polyak:0.1", "--max-norm", "1"]),
        ("dqn", ["--num-envs", "2", "--weight-clip", "0.3", "--target-update", "hard:8"]),
    ],
)
def test_train_command_flag_combinations(tmp_path, capsys, algo, flags):
    dqn = ["--train-freq", "4", "--gradient-steps", "2"] if algo == "dqn" else []
    args = ["train", "--algo", algo, "--steps", "200", "--eval-every", "100", *TINY_FLAGS]
    code = main([*args, *dqn, *flags, "--logdir", str(tmp_path), "--run-name", "r"])
    assert code == 0
    run = tmp_path / "r"
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert summary["steps"] == 200 and config["algo"] == algo and config["impl"] == "native"
    saved = load_checkpoint(run)
    if "--weight-clip" in flags:
        bound = float(flags[flags.index("--weight-clip") + 1])
        online = [n for n in saved["weights"] if n in ("actor", "critic", "q")]
        for name in online:
            for key, value in saved["weights"][name].items():
                if key not in ("scale", "bias"):  # the actors' action scaling buffers
                    assert value.abs().max() <= bound, f"{name}.{key}"
    if "--policy-ema" in flags:
        assert "final_ema_eval_return" in summary
        out = capsys.readouterr().out
        assert "policy EMA" in out
        assert main(["evaluate", str(run), "--episodes", "2", "--ema"]) == 0
        capsys.readouterr()
    capsys.readouterr()
    assert main(["evaluate", str(run / "model.pt"), "--episodes", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["episodes"] == 3 and len(result["returns"]) == 3


def test_evaluate_matches_the_final_evaluation_of_the_run(tmp_path, capsys):
    args = ["train", "--algo", "dqn", "--steps", "200", "--train-freq", "4", *TINY_FLAGS]
    assert main([*args, "--logdir", str(tmp_path), "--run-name", "r"]) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    capsys.readouterr()
    seed = 1_000_000  # the training command evaluates with seed + 1e6
    assert main(["evaluate", str(tmp_path / "r"), "--episodes", "2", "--seed", str(seed)]) == 0
    assert f"mean return {summary['final_eval_return']:.1f}" in capsys.readouterr().out


@pytest.mark.parametrize("algo", ["dqn", "sac", "td3", "ddpg", "tqc"])
def test_impl_sb3_trains_evaluates_and_resumes(tmp_path, capsys, algo):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dqn = ["--train-freq", "4", "--gradient-steps", "2"] if algo == "dqn" else []
    args = ["train", "--impl", "sb3", "--algo", algo, "--steps", "160", *TINY_FLAGS, *dqn]
    extra = [
        "--policy-ema",
        "0.1",
        "--weight-clip",
        "1.0",
        "--eval-every",
        "100",
        "--drift-every",
        "50",
    ]
    assert main([*args, *extra, "--logdir", str(tmp_path), "--run-name", "r"]) == 0
    run = tmp_path / "r"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["impl"] == "sb3" and summary["steps"] == 160
    assert "final_ema_eval_return" in summary
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    assert {"eval/return", "eval/ema_return"} <= set(events.Tags()["scalars"])
    assert any(tag.startswith("drift/") for tag in events.Tags()["scalars"])
    assert main(["evaluate", str(run), "--episodes", "2"]) == 0
    saved = load_checkpoint(run)
    assert main(["train", "--resume", str(run), "--steps", "200", "--no-progress"]) == 0
    resumed = load_checkpoint(run)
    assert resumed["steps"] == 200
    n = len(saved["training"]["buffer"]["observations"])
    assert torch.equal(
        resumed["training"]["buffer"]["observations"][:n],
        saved["training"]["buffer"]["observations"],
    )


def test_impl_sb3_hard_target_update_every_k_gradient_steps():
    from rlweights.agents.sb3_train import build_sb3_model

    config = tiny("sac", total_steps=200, learning_starts=100, target_update="hard:3")
    model, attachment = build_sb3_model(config)
    assert model.tau == 1.0
    model.learn(106)  # gradient steps after steps 101..106: six, two copies
    assert model._n_updates == 6
    pairs = zip(model.critic.parameters(), model.critic_target.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    model.learn(2, reset_num_timesteps=False)  # 8 gradient steps: the target lags again
    pairs = zip(model.critic.parameters(), model.critic_target.parameters(), strict=True)
    assert not all(torch.equal(a, b) for a, b in pairs)
    attachment.detach()


def _errors(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--env", "NoSuchEnv-v0"], "environment 'NoSuchEnv-v0'"),
        (["--algo", "dqn", "--env", "Pendulum-v1"], "DQN needs discrete actions"),
        (["--algo", "sac", "--env", "CartPole-v1"], "SAC needs continuous"),
        (["--algo", "td3", "--env", "CartPole-v1"], "TD3 needs continuous"),
        (["--steps", "0"], "impossible values: total_steps=0"),
        (["--policy-ema", "1.5"], "policy_ema=1.5"),
        (["--weight-clip", "-1"], "weight_clip=-1.0"),
        (["--max-norm", "0"], "max_norm=0.0"),
        (["--gamma", "2"], "gamma=2.0"),
        (["--eval-episodes", "0"], "eval_episodes=0"),
        (["--target-update", "polyak:2"], "'polyak:TAU' with TAU in [0, 1]"),
        (["--target-update", "hard:0"], "'hard:EVERY' with an integer EVERY >= 1"),
        (["--hidden", "0,4"], "hidden=(0, 4)"),
        # issue 13: these wrote a run folder, raised a traceback or ran out of memory
        (["--env", "nosuchmod:Env-v0"], "environment 'nosuchmod:Env-v0': No module named"),
        (["--seed", "4294967296"], "seed=4294967296"),
        (["--steps", "1e11", "--buffer-size", "1e11"], "needs about 3.3 TiB of memory (replay"),
        (["--impl", "sb3", "--buffer-size", "1e11"], "needs about 3.3 TiB of memory (replay"),
        (["--hidden", "1000000,1000000"], "needs about 54.6 TiB of memory"),
        (["--learning-rate", "inf"], "learning_rate=inf: hyperparameters must be finite"),
        (["--gamma", "nan"], "gamma=nan: hyperparameters must be finite"),
        *([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA device")]),
    ],
)
def test_bad_train_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, message):
    code = main(["train", *args, "--logdir", str(tmp_path / "runs")])
    assert code == 2
    (line,) = _errors(capsys)
    assert line.startswith("rlweights train: error: ") and message in line
    assert not (tmp_path / "runs").exists()


def test_unwritable_or_occupied_logdir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--logdir", str(blocker)]) == 2
    assert "exists and is not a directory" in _errors(capsys)[0]
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    assert main(["train", "--logdir", str(tmp_path / "runs"), "--run-name", "taken"]) == 2
    assert "is not a run folder that rlweights created" in _errors(capsys)[0]
    assert list((tmp_path / "runs" / "taken").iterdir()) == []
    (tmp_path / "runs" / "taken" / "model.pt").write_bytes(b"a run")
    assert main(["train", "--logdir", str(tmp_path / "runs"), "--run-name", "taken"]) == 2
    assert "already exists: continue it with --resume" in _errors(capsys)[0]
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    try:
        if os.access(readonly, os.W_OK):
            pytest.skip("running as a user who can write anywhere (see the next test)")
        assert main(["train", "--logdir", str(readonly / "runs")]) == 2
        assert "not writable" in _errors(capsys)[0]
    finally:
        readonly.chmod(0o700)


def test_unwritable_logdir_as_root_is_still_refused(tmp_path, capsys):
    """Root may write anywhere; a path under a regular file is unwritable for everyone."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--logdir", str(blocker / "runs")]) == 2
    assert "not writable" in _errors(capsys)[0]
    assert blocker.read_text() == "x"


def test_bad_checkpoints_are_refused_in_one_line(tmp_path, capsys):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "foreign.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 not really a zip")
    cases = {
        "foreign.pt": "not an rlweights training checkpoint",
        "corrupt.pt": "is not a readable checkpoint",
        "missing.pt": "no checkpoint at",
    }
    for name, message in cases.items():
        assert main(["evaluate", str(tmp_path / name)]) == 2
        (line,) = _errors(capsys)
        assert line.startswith("rlweights evaluate: error: ") and message in line
        run = tmp_path / f"run-{name}"  # --resume takes the run directory
        run.mkdir()
        if (tmp_path / name).exists():
            (run / "model.pt").write_bytes((tmp_path / name).read_bytes())
        assert main(["train", "--resume", str(run)]) == 2
        (line,) = _errors(capsys)
        assert line.startswith("rlweights train: error: ") and message in line
        assert sorted(p.name for p in run.iterdir()) == (
            ["model.pt"] if name != "missing.pt" else []
        )


class _Exploit:
    """Unpickling this would create a marker file: a checkpoint must never run code."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_would_run_code_is_refused_and_does_not_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = str(marker)
    torch.save({"format": "rlweights-agent", "version": 1, "x": exploit}, tmp_path / "evil.pt")
    assert main(["evaluate", str(tmp_path / "evil.pt")]) == 2
    assert "is not a readable checkpoint (Weights only load failed)" in _errors(capsys)[0]
    assert not marker.exists()


def test_resume_refuses_other_settings_and_finished_runs(tmp_path, capsys):
    args = ["train", "--steps", "60", *TINY_FLAGS, "--logdir", str(tmp_path), "--run-name", "r"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "r"), "--algo", "td3"]) == 2
    assert "only --steps, --device and --no-progress" in _errors(capsys)[0]
    assert main(["train", "--resume", str(tmp_path / "r")]) == 2
    assert "is at step 60 of 60: pass --steps N with N > 60" in _errors(capsys)[0]
    assert main(["evaluate", str(tmp_path / "r"), "--ema"]) == 2
    assert "trained without --policy-ema" in _errors(capsys)[0]


def test_a_version_1_checkpoint_evaluates_but_does_not_resume(tmp_path, capsys):
    args = ["train", "--steps", "60", *TINY_FLAGS, "--logdir", str(tmp_path), "--run-name", "r"]
    assert main(args) == 0
    path = tmp_path / "r" / "model.pt"
    state = torch.load(path, weights_only=True)
    state.pop("checksum")  # version 1 had none
    torch.save({**state, "version": 1}, path)
    capsys.readouterr()
    assert main(["evaluate", str(path), "--episodes", "1"]) == 0
    assert "has no checksum" in _errors(capsys)[0]
    assert main(["train", "--resume", str(tmp_path / "r"), "--steps", "80"]) == 2
    assert (
        "(checkpoint version 1): it evaluates, but only versions 2 to 3 resume"
        in _errors(capsys)[0]
    )


def test_real_process_exit_codes_and_no_traceback(tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "rlweights", *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=SUBPROCESS_TIMEOUT,
        )

    bad = run("train", "--algo", "dqn", "--env", "Pendulum-v1")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    usage = run("train", "--steps", "many")
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1
    assert "argument --steps: expected a whole number, got 'many'" in usage.stderr
    assert not (tmp_path / "runs").exists()


def test_train_script_and_help(tmp_path):
    script = ROOT / "scripts" / "train.py"
    help_text = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert help_text.returncode == 0
    for flag in ("--algo", "--target-update", "--policy-ema", "--resume", "--impl", "--max-norm"):
        assert flag in help_text.stdout
    done = subprocess.run(
        [sys.executable, str(script), "--steps", "60", *TINY_FLAGS, "--logdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    (run,) = tmp_path.iterdir()
    assert run.name.startswith("sac-Pendulum-v1-s0-")
    assert (run / "summary.json").is_file()


def test_progress_bar_shows_rate_and_return(tmp_path, capsys):
    args = ["train", "--steps", "250", "--hidden", "16,16", "--learning-starts", "50"]
    assert main([*args, "--eval-episodes", "1", "--logdir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "step/s" in err and "return=" in err and "250/250" in err


def test_ctrl_c_on_the_command_checkpoints_and_resume_finishes(tmp_path):
    run = tmp_path / "r"
    cmd = [sys.executable, "-m", "rlweights", "train", "--steps", "100000", *TINY_FLAGS]
    proc = subprocess.Popen(
        [*cmd, "--logdir", str(tmp_path), "--run-name", "r"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().startswith("rlweights train: native sac")
        time.sleep(3)  # well inside the training loop
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "stopped by Ctrl-C during training; the checkpoint of step" in err
    assert "Traceback" not in err
    steps = load_checkpoint(run)["steps"]
    assert 0 < steps < 100_000
    assert main(["train", "--resume", str(run), "--steps", str(steps + 50), "--no-progress"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == steps + 50


@pytest.mark.parametrize("name", ["a/b", "../escaped", ".hidden", "x" * 300])
def test_a_run_name_is_one_folder_inside_logdir(tmp_path, capsys, name):
    """Issue 13: --run-name a/b failed with a traceback, ../escaped wrote outside --logdir."""
    code = main(["train", "--run-name", name, "--logdir", str(tmp_path / "runs"), "--steps", "10"])
    assert code == 2
    (line,) = _errors(capsys)
    assert line.startswith("rlweights train: error: --run-name") and "one folder name" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written anywhere


def test_default_run_name_of_an_env_id_with_a_slash_and_resume_from_the_file(tmp_path, capsys):
    """Issue 13: the default name of rlweights/Chain-v0 held a '/' (FileNotFoundError), and
    --resume RUN/model.pt looked for RUN/model.pt/model.pt."""
    args = ["train", "--algo", "dqn", "--env", "rlweights/Chain-v0", "--steps", "60"]
    args += [*TINY_FLAGS, "--logdir", str(tmp_path)]
    assert main(args) == 0
    (run,) = tmp_path.iterdir()
    assert run.name.startswith("dqn-rlweights-Chain-v0-s0-") and (run / "model.pt").is_file()
    resume = ["train", "--resume", str(run / "model.pt"), "--steps", "90", "--no-progress"]
    assert main(resume) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 90


def test_integer_flags_take_scientific_notation(tmp_path):
    args = ["train", "--steps", "6e1", *TINY_FLAGS, "--logdir", str(tmp_path), "--run-name", "r"]
    assert main([*args, "--eval-every", "3e1"]) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["steps"] == 60
    with pytest.raises(SystemExit) as exit_code:  # argparse's one line
        main(["train", "--steps", "1.5"])
    assert exit_code.value.code == 2


def test_evaluate_refuses_a_negative_seed(tmp_path, capsys):
    args = ["train", "--steps", "60", *TINY_FLAGS, "--logdir", str(tmp_path), "--run-name", "r"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "r"), "--seed", "-1"]) == 2
    (line,) = _errors(capsys)
    assert line == "rlweights evaluate: error: --seed must be in [0, 2147483647], got -1"


class _Sized(gym.Env):
    """An environment whose observation size is set at registration."""

    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, size: int = 3):
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (size,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(self.observation_space.shape, np.float32), {}

    def step(self, action):
        return np.zeros(self.observation_space.shape, np.float32), 0.0, False, False, {}


def test_resume_where_the_environment_is_missing_or_different_is_one_line(tmp_path, capsys):
    """Issue 13: --resume with the run's environment not installed, or with other spaces,
    ended in a traceback."""
    env_id = "rlweights-test/Sized-v0"
    gym.register(env_id, entry_point=_Sized, max_episode_steps=20, kwargs={"size": 3})
    try:
        args = ["train", "--env", env_id, "--steps", "60", *TINY_FLAGS]
        assert main([*args, "--logdir", str(tmp_path), "--run-name", "r"]) == 0
        run = tmp_path / "r"
        before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
        gym.registry.pop(env_id)
        gym.register(env_id, entry_point=_Sized, max_episode_steps=20, kwargs={"size": 4})
        capsys.readouterr()
        assert main(["train", "--resume", str(run), "--steps", "90"]) == 2
        (line,) = _errors(capsys)
        assert line.startswith(f"rlweights train: error: environment '{env_id}' here has ")
        assert "(3,), float32) and Box(" in line and "resume it where its environment" in line
        assert main(["evaluate", str(run)]) == 2
        assert "resume it where its environment is the same" in _errors(capsys)[0]
        gym.registry.pop(env_id)
        assert main(["train", "--resume", str(run), "--steps", "90"]) == 2
        (line,) = _errors(capsys)
        assert line.startswith(f"rlweights train: error: environment '{env_id}': ")
        assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    finally:
        gym.registry.pop(env_id, None)


def test_files_of_a_run_honour_the_umask(tmp_path):
    """Issue 13: config.json, model.pt and summary.json were 600 (mkstemp's), events 644."""
    mask = os.umask(0o027)
    try:
        args = ["train", "--steps", "60", *TINY_FLAGS, "--logdir", str(tmp_path)]
        assert main([*args, "--run-name", "r"]) == 0
    finally:
        os.umask(mask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "r").iterdir()}
    assert {modes[name] for name in ("config.json", "model.pt", "summary.json")} == {0o640}


def test_a_diverged_run_writes_strict_json_with_null(tmp_path):
    """Issue 13: a NaN return went into summary.json as NaN, which is not JSON."""
    from rlweights.agents.run import run_summary
    from rlweights.files import write_json

    config = tiny("sac")
    results = {"return": np.array([float("nan"), 1.0]), "ema_return": np.array([2.0])}
    summary = run_summary(config, "native", 60, results, 60, 1.0, 2.0, [float("inf")])
    write_json(tmp_path / "summary.json", summary)

    def refuse(token):
        raise AssertionError(f"{token} in summary.json")

    written = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
    assert written["final_eval_return"] is None and written["diverged"] is True
    assert written["mean_last_10_train_returns"] is None
    assert written["final_ema_eval_return"] == 2.0


def test_sb3_stops_at_the_asked_step_count(tmp_path):
    """Issue 13: --impl sb3 --algo dqn --steps 300 trained 512 steps (SB3 ends its rollout:
    the CartPole preset collects 256 steps per rollout)."""
    args = ["train", "--impl", "sb3", "--algo", "dqn", "--steps", "300", *TINY_FLAGS]
    assert main([*args, "--logdir", str(tmp_path), "--run-name", "r"]) == 0
    run = tmp_path / "r"
    assert json.loads((run / "summary.json").read_text())["steps"] == 300
    assert load_checkpoint(run)["steps"] == 300
    assert main(["train", "--resume", str(run), "--steps", "400", "--no-progress"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 400


def test_a_flipped_byte_in_the_weights_is_refused(tmp_path, capsys):
    """Issue 13: a corrupted model.pt resumed without complaint; now a checksum of its
    content is checked at every load."""
    args = ["train", "--steps", "60", *TINY_FLAGS, "--logdir", str(tmp_path), "--run-name", "r"]
    assert main(args) == 0
    path = tmp_path / "r" / "model.pt"
    state = torch.load(path, weights_only=True)
    weights = [w for net in state["weights"].values() for w in net.values()]
    weight = max(weights, key=torch.Tensor.numel)  # bytes found once in the file
    data = bytearray(path.read_bytes())
    at = data.find(weight.numpy().tobytes())
    assert at > 0 and data.count(weight.numpy().tobytes()) == 1
    data[at + 5] ^= 0x10
    path.write_bytes(bytes(data))
    capsys.readouterr()
    for command in (
        ["train", "--resume", str(path.parent), "--steps", "90"],
        ["evaluate", str(path)],
    ):
        assert main(command) == 2
        (line,) = _errors(capsys)
        assert line.endswith(
            "model.pt is damaged: its content does not match the checksum written with it (a "
            "changed or corrupted file); use an intact copy"
        )


@pytest.mark.parametrize("impl", ["native", "sb3"])
def test_a_default_run_draws_an_evaluation_curve(tmp_path, impl):
    """Issue 13: the main job evaluated twice, and TensorBoard's Scalars dashboard (outliers
    ignored in chart scaling, its default) draws no line for two points. A run evaluates
    10 times by default (scripts/main_job_screenshot.sh shows it in Chromium)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["train", "--impl", impl, "--steps", "300", *TINY_FLAGS, "--logdir", str(tmp_path)]
    assert main([*args, "--run-name", "r"]) == 0
    events = EventAccumulator(str(tmp_path / "r"), size_guidance={"scalars": 0})
    events.Reload()
    steps = [event.step for event in events.Scalars("eval/return")]
    assert steps == list(range(30, 301, 30))


@pytest.mark.parametrize("buffer_size", [10_000, 150])
def test_a_run_resumed_with_more_steps_keeps_its_replay_rows_in_order(tmp_path, buffer_size):
    """A run of 200 steps resumed to 260: its buffer holds what an unstopped run of 260
    steps holds (the 200 rows of the first run, in place, then the new rows after them;
    with a buffer of 150 rows, the ring goes on where it was), never an empty row."""
    config = tiny(
        "td3", total_steps=260, learning_starts=1000, eval_every=0, buffer_size=buffer_size
    )
    unstopped = tmp_path / "unstopped"
    train(config, unstopped)
    train(dataclasses.replace(config, total_steps=200), tmp_path / "r")
    before = load_checkpoint(tmp_path / "r")["training"]["buffer"]
    train(config, tmp_path / "r", resume=True)
    after = load_checkpoint(tmp_path / "r")["training"]["buffer"]
    reference = load_checkpoint(unstopped)["training"]["buffer"]
    assert (after["size"], after["position"]) == (reference["size"], reference["position"])
    capacity = min(buffer_size, 260)
    old = [(step % capacity) for step in range(max(0, 260 - capacity), 200)]  # rows kept
    assert torch.equal(after["obs"][old], reference["obs"][old])  # the same first 200 steps
    assert torch.equal(after["obs"][old], before["obs"][old])
    assert (after["obs"].abs().sum(-1) > 0).all()  # every row written (Pendulum's obs != 0)


PLASTIC = {"reset_every": 45, "reset_layers": "critic.*", "shrink_perturb": (0.8, 0.1)}
PLASTIC |= {"sp_every": 35}


def _sb3_target_update(algo: str):
    """The function SB3's ``algo`` module calls for its target updates (rlweights' while a
    model of it is attached, in this process)."""
    import importlib

    package = "sb3_contrib" if algo == "tqc" else "stable_baselines3"
    return importlib.import_module(f"{package}.{algo}.{algo}").polyak_update


def _counters(state):
    """``state`` without its tensors (weights, which differ once a resumed run's
    environments restart their episodes): the counters and settings."""
    if isinstance(state, dict):
        return {k: _counters(v) for k, v in state.items() if not isinstance(v, torch.Tensor)}
    return state


def _schedules(saved) -> dict:
    """What a checkpoint says of a run's schedules: its routines' counters and the number of
    gradient updates."""
    training = saved["training"]
    if saved["impl"] == "native":
        agent = training["agent"]
        return _counters({**agent["routines"], "updates": agent["gradient_updates"]})
    return _counters({**training["routines"], "updates": training["n_updates"]})


@pytest.mark.parametrize(
    ("impl", "algo", "settings"),
    [
        ("native", "sac", {"target_update": "hard:7", "policy_ema": 0.2, **PLASTIC}),
        ("native", "dqn", {"target_update": "hard:8", "weight_clip": 1.0}),
        (
            "sb3",
            "sac",
            {"target_update": "hard:7", "policy_ema": 0.2, "weight_clip": 1.0, **PLASTIC},
        ),
        ("sb3", "td3", {"target_update": "hard:3", "policy_ema": 0.1}),
        ("native", "ddpg", {"target_update": "hard:3", "policy_ema": 0.1, "max_norm": 1.5}),
        ("native", "tqc", {"target_update": "hard:5", "policy_ema": 0.1, **PLASTIC}),
        ("native", "droq", {"policy_ema": 0.1, "gradient_steps": 3, "policy_delay": 2}),
        ("sb3", "tqc", {"target_update": "hard:5", "policy_ema": 0.1}),
        ("sb3", "dqn", {"target_update": "hard:8", "train_freq": 1, "gradient_steps": 1}),
    ],
)
def test_every_schedule_of_a_stopped_and_resumed_run_is_that_of_an_unstopped_run(
    tmp_path, impl, algo, settings
):
    """Stopped by Ctrl-C at step 130 and resumed to 200: the target update's, the policy
    EMA's and the plasticity schedules' counters, and the number of gradient updates, are
    those of a run of 200 steps without a stop (SB3's hard copies once restarted at 0)."""
    from rlweights.agents.sb3_train import train_sb3

    run = train if impl == "native" else train_sb3
    config = tiny(algo, total_steps=200, eval_every=0, drift_every=0, **settings)
    run(config, tmp_path / "unstopped")
    before = _sb3_target_update(algo) if impl == "sb3" else None

    def interrupt(steps, info):
        if steps == 130:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        run(config, tmp_path / "r", progress=interrupt)
    assert load_checkpoint(tmp_path / "r")["steps"] == 130
    if impl == "sb3":  # the stopped run gave SB3 its target updates back as it found them
        assert _sb3_target_update(algo) is before
    run(config, tmp_path / "r", resume=True)
    resumed = _schedules(load_checkpoint(tmp_path / "r"))
    reference = _schedules(load_checkpoint(tmp_path / "unstopped"))
    assert resumed == reference
    assert reference["updates"] > 0


def _reseal(path, change) -> None:
    """Rewrite the checkpoint at ``path`` with ``change(state)`` applied and a matching
    checksum (what anyone can do: the checksum finds damage, not intent)."""
    from rlweights.files import sealed

    state = torch.load(path, weights_only=True)
    state.pop("checksum")
    change(state)
    torch.save(sealed(state), path)


def test_a_version_2_checkpoint_resumes_under_the_names_of_version_3(tmp_path):
    """Version 3 renamed the config's ``clip`` (now ``weight_clip``) and the replay buffer's
    ``dones`` (now ``terminated``): a version 2 run, its model.pt and config.json written with
    the old names, resumes to the same weights as the same run written as version 3."""
    import shutil

    args = ["train", "--steps", "120", *TINY_FLAGS, "--weight-clip", "0.5", "--logdir"]
    assert main([*args, str(tmp_path), "--run-name", "v3"]) == 0
    shutil.copytree(tmp_path / "v3", tmp_path / "v2")

    def as_version_2(state):
        state["version"] = 2
        state["config"]["clip"] = state["config"].pop("weight_clip")
        buffer = state["training"]["buffer"]
        buffer["dones"] = buffer.pop("terminated")

    _reseal(tmp_path / "v2" / "model.pt", as_version_2)
    config = json.loads((tmp_path / "v2" / "config.json").read_text())
    config["clip"] = config.pop("weight_clip")
    (tmp_path / "v2" / "config.json").write_text(json.dumps(config))
    for name in ("v2", "v3"):
        assert main(["train", "--resume", str(tmp_path / name), "--steps", "200"]) == 0
    new, old = (load_checkpoint(tmp_path / name) for name in ("v3", "v2"))
    assert new["version"] == old["version"] == 3 and old["config"]["weight_clip"] == 0.5
    for network, tensors in new["weights"].items():
        for key, value in tensors.items():
            assert torch.equal(value, old["weights"][network][key]), (network, key)
    assert torch.equal(
        new["training"]["buffer"]["terminated"], old["training"]["buffer"]["terminated"]
    )


def test_an_environment_id_from_a_file_never_imports_a_module(tmp_path, capsys, monkeypatch):
    """A checkpoint or config.json naming "module:Env-v0" would make gym.make import the
    module (any code in it, even a file in the working directory): refused unless the user
    names the same id with --env."""
    (tmp_path / "sneaky.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["train", "--steps", "60", *TINY_FLAGS, "--logdir", str(tmp_path)]
    assert main([*args, "--run-name", "r"]) == 0
    _reseal(tmp_path / "r" / "model.pt", lambda s: s["config"].update(env_id="sneaky:Env-v1"))
    (tmp_path / "stopped").mkdir()  # a run stopped before its first checkpoint
    run_folder.mark(tmp_path / "stopped")
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    (tmp_path / "stopped" / "config.json").write_text(json.dumps(config | {"env_id": "sneaky:X"}))
    capsys.readouterr()
    commands = [
        ["evaluate", str(tmp_path / "r")],
        ["train", "--resume", str(tmp_path / "r"), "--steps", "80"],
        ["train", "--resume", str(tmp_path / "stopped"), "--steps", "80"],
    ]
    for command in commands:
        assert main(command) == 2
        (line,) = _errors(capsys)
        assert "would import module 'sneaky'" in line and "--env sneaky:" in line, line
    assert not (tmp_path / "ran").exists()
    # another id than the file's is refused too; the same id is the user's choice
    assert main([*commands[0], "--env", "sneaky:Other-v1"]) == 2
    assert "was trained on 'sneaky:Env-v1'" in _errors(capsys)[0]
    assert not (tmp_path / "ran").exists()
    assert main([*commands[0], "--env", "sneaky:Env-v1"]) == 2  # imported, but no such env
    assert (tmp_path / "ran").exists() and "environment 'sneaky:Env-v1'" in _errors(capsys)[0]


def test_a_current_checkpoint_without_its_checksum_is_refused(tmp_path, capsys):
    args = ["train", "--steps", "60", *TINY_FLAGS, "--logdir", str(tmp_path), "--run-name", "r"]
    assert main(args) == 0
    path = tmp_path / "r" / "model.pt"
    state = torch.load(path, weights_only=True)
    state.pop("checksum")
    torch.save(state, path)
    capsys.readouterr()
    assert main(["evaluate", str(path), "--episodes", "1"]) == 2
    assert "has no checksum" in _errors(capsys)[0]
    assert main(["train", "--resume", str(tmp_path / "r"), "--steps", "80"]) == 2
    assert "has no checksum" in _errors(capsys)[0]
    torch.save({**state, "version": 1}, path)  # written before checksums: evaluates, warned
    assert main(["evaluate", str(path), "--episodes", "1"]) == 0
    (warning,) = _errors(capsys)
    assert warning.startswith("rlweights evaluate: warning: ") and "no checksum" in warning


def _set(*keys_and_value):
    """A change for ``_reseal``: the entry at ``keys`` of the state becomes ``value``."""
    *keys, value = keys_and_value

    def change(state):
        for key in keys[:-1]:
            state = state[key]
        state[keys[-1]] = value

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set("steps", -5), "steps=-5"),
        (_set("steps", 2.5), "steps=2.5"),
        (_set("steps", 10**9), "steps=1000000000"),
        (_set("training", "wall_seconds", float("nan")), "wall_seconds=nan"),
        (_set("training", "wall_seconds", -1.0), "wall_seconds=-1.0"),
        (_set("training", "episodes", ["a"]), "episodes"),
        (_set("training", "episodes", [1.0] * 100), "episodes"),
        (_set("training", "agent", "gradient_updates", -3), "gradient_updates=-3"),
        (_set("training", "buffer", "size", -1), "size=-1"),
        (_set("training", "buffer", "position", 70), "position=70"),
        (_set("training", "buffer", "size", 30), "obs must be"),
        (_set("impl", "other"), "impl='other'"),
        (_set("spaces", ["Box"]), "spaces=['Box']"),
        (_set("config", "batch_size", 2.5), "batch_size=2.5"),
        (_set("config", "hidden", [1.5]), "hidden=[1.5]"),
        (_set("config", "total_steps", "many"), "total_steps='many'"),
        (_set("config", "learning_rate", -1.0), "learning_rate=-1.0"),
    ],
)
def test_every_restored_value_is_checked_as_the_command_line_checks_its_own(
    tmp_path, capsys, change, message
):
    """A checkpoint resealed with impossible values (what anyone can write: the checksum
    finds damage, not intent) is refused in one line, exit 2, before anything is written."""
    args = ["train", "--steps", "60", *TINY_FLAGS, "--logdir", str(tmp_path), "--run-name", "r"]
    assert main([*args, "--eval-every", "0"]) == 0
    run = tmp_path / "r"
    _reseal(run / "model.pt", change)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "80", "--no-progress"]) == 2
    (line,) = _errors(capsys)
    assert line.startswith("rlweights train: error: ") and message in line, line
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_every_restored_value_of_an_sb3_run_is_checked(tmp_path, capsys):
    args = ["train", "--impl", "sb3", "--algo", "dqn", "--steps", "60", *TINY_FLAGS]
    assert main([*args, "--eval-every", "0", "--logdir", str(tmp_path), "--run-name", "r"]) == 0
    run = tmp_path / "r"
    intact = (run / "model.pt").read_bytes()
    update = _sb3_target_update("dqn")
    cases = [
        (_set("training", "buffer", "pos", 10**7), "pos=10000000 outside"),
        (_set("training", "buffer", "full", 1), "full=1 is not a bool"),
        (_set("training", "buffer", "pos", 30), "observations must be"),
        (_set("training", "n_calls", -1), "n_calls=-1"),
        (_set("training", "n_updates", "7"), "n_updates='7'"),
        (_set("training", "routines", {"ema": {}}), "routines are ['ema']"),
        (lambda s: s["training"].pop("routines"), "before --impl sb3 checkpoints kept"),
    ]
    capsys.readouterr()
    for change, message in cases:
        (run / "model.pt").write_bytes(intact)
        _reseal(run / "model.pt", change)
        before = {p.name: p.read_bytes() for p in run.iterdir()}
        assert main(["train", "--resume", str(run), "--steps", "80", "--no-progress"]) == 2
        (line,) = _errors(capsys)
        assert line.startswith("rlweights train: error: ") and message in line, line
        assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert _sb3_target_update("dqn") is update  # a refused restore detaches too


def test_absurd_sizes_from_a_checkpoint_or_for_evaluation_are_one_line(tmp_path, capsys):
    """The memory estimate covers a restored config (networks of a resealed checkpoint) and
    the evaluation environments (one per episode, made together), before any allocation."""
    args = ["train", "--steps", "60", *TINY_FLAGS, "--logdir", str(tmp_path)]
    assert main([*args, "--run-name", "r"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "r"), "--episodes", "1e9"]) == 2
    assert "needs about" in _errors(capsys)[0]
    assert main([*args, "--run-name", "e", "--eval-episodes", "1e9"]) == 2
    (line,) = _errors(capsys)
    assert "needs about" in line and "evaluation environments" in line, line
    assert not (tmp_path / "e").exists()
    _reseal(tmp_path / "r" / "model.pt", _set("config", "hidden", [10**6, 10**6]))
    before = (tmp_path / "r" / "model.pt").read_bytes()
    assert main(["evaluate", str(tmp_path / "r"), "--episodes", "1"]) == 2
    assert "needs about" in _errors(capsys)[0]
    assert main(["train", "--resume", str(tmp_path / "r"), "--steps", "80", "--no-progress"]) == 2
    assert "needs about" in _errors(capsys)[0]
    assert (tmp_path / "r" / "model.pt").read_bytes() == before
