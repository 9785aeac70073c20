"""The environments of ``envs/`` (issue 7): Gymnasium's checker, seeding, the book's Baird
dynamics and features, and the chain's exact Q* against brute force and a closed form."""

from __future__ import annotations

import doctest
import itertools
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import rlweights.envs as envs
from rlweights.envs.baird import BairdCounterexample
from rlweights.envs.chain import Chain


@pytest.mark.parametrize("env_id", envs.IDS)
def test_every_registered_id_passes_gymnasiums_checker(env_id):
    assert env_id in gym.registry
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the passive checker's warnings too
        env = gym.make(env_id)
        check_env(env.unwrapped)
        env.reset(seed=0)
        for _ in range(20):
            env.step(env.action_space.sample())
        env.close()


def _trajectory(env_id, seed, actions, **kwargs):
    env = gym.make(env_id, **kwargs)
    obs, info = env.reset(seed=seed)
    seen = [(obs.tolist(), info["state"])]
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        seen.append((obs.tolist(), reward, terminated, truncated, info["state"]))
        if terminated or truncated:
            obs, info = env.reset()
            seen.append((obs.tolist(), info["state"]))
    env.close()
    return seen


@pytest.mark.parametrize("env_id", envs.IDS)
def test_same_seed_same_episodes_other_seed_other_episodes(env_id):
    actions = np.random.default_rng(0).integers(2, size=300).tolist()
    first = _trajectory(env_id, 3, actions)
    assert first == _trajectory(env_id, 3, actions)
    assert first != _trajectory(env_id, 4, actions)


def test_baird_follows_the_book():
    env = gym.make("rlweights/BairdCounterexample-v0")
    x, w0 = BairdCounterexample.FEATURES, BairdCounterexample.INITIAL_WEIGHTS
    # The book's values under the initial weights: 2 w_i + w_8 = 3 above, w_7 + 2 w_8 = 12.
    np.testing.assert_array_equal(x @ w0, [3, 3, 3, 3, 3, 3, 12])
    obs, info = env.reset(seed=1)
    np.testing.assert_array_equal(obs, x[info["state"]])
    counts = np.zeros(7, dtype=int)
    rng = np.random.default_rng(1)
    for _ in range(7000):
        solid = rng.random() < 1 / 7
        obs, reward, terminated, truncated, info = env.step(int(solid))
        assert reward == 0.0 and not terminated
        np.testing.assert_array_equal(obs, x[info["state"]])
        if solid:
            assert info["state"] == 6
        else:
            assert info["state"] < 6
        counts[info["state"]] += 1
        if truncated:
            env.reset()
    # The behaviour policy makes the next state uniform: about 1000 visits each.
    assert counts.min() > 850 and counts.max() < 1150
    starts = [env.reset(seed=seed)[1]["state"] for seed in range(700)]
    assert set(starts) == set(range(7))  # starts anywhere
    np.testing.assert_allclose(BairdCounterexample.BEHAVIOUR_PROBS, [6 / 7, 1 / 7])


def test_baird_is_truncated_by_the_registered_time_limit_and_never_terminates():
    env = gym.make("rlweights/BairdCounterexample-v0")
    env.reset(seed=0)
    for step in range(1, 1001):
        _, _, terminated, truncated, _ = env.step(step % 2)
        assert not terminated
        assert truncated == (step == 1000)


def test_chain_q_star_has_the_closed_form_without_slip():
    n, gamma = 7, 0.9
    q = Chain(length=n, slip=0.0).optimal_q(gamma)
    for s in range(n - 1):
        # Entering the last cell pays 1: from s, moving right reaches it after n-1-s moves.
        assert q[s, 1] == pytest.approx(gamma ** (n - 2 - s), abs=1e-10)
        assert q[s, 0] == pytest.approx(gamma ** (n - 1 - max(s - 1, 0)), abs=1e-10)
    np.testing.assert_array_equal(q[n - 1], [0.0, 0.0])


@pytest.mark.parametrize(("n", "slip", "gamma"), [(5, 0.1, 0.9), (6, 0.3, 0.99), (4, 0.45, 0.5)])
def test_chain_q_star_matches_brute_force_over_all_policies(n, slip, gamma):
    chain = Chain(length=n, slip=slip)
    transitions, rewards = chain.model()
    expected = (transitions * rewards).sum(axis=2)
    best = np.full(n, -np.inf)
    for policy in itertools.product((0, 1), repeat=n - 1):  # every deterministic policy
        actions = [*policy, 0]  # the terminal cell's action does not matter (zero rows)
        p = transitions[np.arange(n), actions]
        r = expected[np.arange(n), actions]
        values = np.linalg.solve(np.eye(n) - gamma * p, r)
        best = np.maximum(best, values)
    q_star = expected + gamma * transitions @ best
    np.testing.assert_allclose(chain.optimal_q(gamma), q_star, atol=1e-9)
    # Model rows are distributions (the terminal cell's are empty).
    np.testing.assert_allclose(transitions[: n - 1].sum(axis=2), 1.0)


def test_chain_dynamics_slip_reward_and_termination():
    env = gym.make("rlweights/Chain-v0", length=6, slip=0.2)
    obs, info = env.reset(seed=0)
    assert info["state"] == 0 and obs.tolist() == [1, 0, 0, 0, 0, 0]
    env.unwrapped.state = 3
    slipped = 0
    for _ in range(5000):
        env.unwrapped.state = 3
        _, reward, terminated, _, info = env.step(1)
        assert info["state"] in (2, 4) and reward == 0.0 and not terminated
        slipped += info["state"] == 2
    assert 0.18 < slipped / 5000 < 0.22
    env.unwrapped.state = 4
    for _ in range(100):  # slips may delay it, but it gets there
        obs, reward, terminated, _, info = env.step(1)
        if terminated:
            assert reward == 1.0 and info["state"] == 5 and obs[5] == 1.0
            break
        assert reward == 0.0
    else:
        pytest.fail("never reached the last cell")
    env.reset(seed=0)
    env.unwrapped.state = 0
    _, _, _, _, info = env.step(0)  # left in the leftmost cell (or a slip to the right)
    assert info["state"] in (0, 1)


def test_bad_arguments_and_rendering():
    with pytest.raises(ValueError, match="length must be an int >= 2"):
        Chain(length=1)
    with pytest.raises(ValueError, match=r"slip must be in \[0, 0\.5\)"):
        Chain(slip=0.5)
    with pytest.raises(ValueError, match="render_mode"):
        BairdCounterexample(render_mode="human")
    with pytest.raises(ValueError, match="gamma must be in"):
        Chain().optimal_q(1.0)
    env = Chain(length=4, render_mode="ansi")
    env.reset(seed=0)
    assert env.render() == "A..G\n"
    baird = BairdCounterexample(render_mode="ansi")
    baird.reset(seed=0)
    assert baird.render().count("*") == 1
    with pytest.raises(ValueError, match="action must be 0"):
        env.step(2)


@pytest.mark.parametrize("module", [envs, envs.baird, envs.chain])
def test_documented_examples_are_true(module):
    result = doctest.testmod(module)
    assert result.failed == 0 and result.attempted > 0
