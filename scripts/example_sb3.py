"""Stable-Baselines3's SAC on Pendulum-v1 with rlweights plugged in.

``attach(model)`` routes SB3's own target updates through rlweights' fast path (the model
trains bit-identically), ``PolicyAveragingCallback`` keeps an EMA of the policy (updated after
every optimizer step of the actor) and ``DriftCallback`` logs weight drift into the model's
TensorBoard run. At the end both the online and the averaged policy play the same seeded
episodes with SB3's ``evaluate_policy``, and the averaged policy is saved as a normal SB3
model (``SAC.load`` acts with the average).

    python scripts/example_sb3.py --steps 20000
    tensorboard --logdir runs/example_sb3
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stable_baselines3 import SAC
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

from rlweights.sb3 import DriftCallback, PolicyAveragingCallback, attach


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000, help="environment steps (20000)")
    parser.add_argument("--learning-starts", type=int, default=100, help="random steps first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logdir", default="runs/example_sb3", help="TensorBoard folder")
    parser.add_argument("--drift-every", type=int, default=1000, help="log drift every N steps")
    parser.add_argument("--eval-episodes", type=int, default=10)
    args = parser.parse_args(argv)

    model = SAC(
        "MlpPolicy",
        "Pendulum-v1",
        learning_rate=1e-3,  # rl-baselines3-zoo's Pendulum SAC; the rest are SB3's defaults
        buffer_size=args.steps,
        learning_starts=args.learning_starts,
        tensorboard_log=args.logdir,
        seed=args.seed,
        device="cpu",
    )
    attach(model)  # the one line: SB3's target updates (model.tau) on rlweights' fast path
    averaging = PolicyAveragingCallback("ema", tau=0.005, warmup=True)  # EMA of model.policy
    drift = DriftCallback(every=args.drift_every)  # drift/critic/* (with its target)
    model.learn(args.steps, callback=[averaging, drift], tb_log_name="sac")
    run_dir = Path(model.logger.get_dir())  # LOGDIR/sac_1, the run SB3 made

    # The online policy and its EMA on the same episodes (the env is seeded before each).
    eval_env = make_vec_env("Pendulum-v1", n_envs=1)
    result = {}
    for name, policy in (("online", model.policy), ("ema", averaging.averaged)):
        eval_env.seed(10_000 + args.seed)
        mean, _ = evaluate_policy(policy, eval_env, args.eval_episodes, deterministic=True)
        result[f"eval/{name}_return"] = float(mean)
        model.logger.record(f"eval/{name}_return", float(mean))
    model.logger.dump(model.num_timesteps)  # into the same TensorBoard run
    saved = averaging.save_averaged(run_dir / "sac_ema.zip")  # SAC.load(saved): the average

    print(f"after {model.num_timesteps} steps ({averaging.averager.updates} EMA updates):")
    for tag, value in result.items():
        print(f"  {tag} {value:.1f}")
    print(f"TensorBoard run {run_dir}, averaged model {saved}")
    return result


if __name__ == "__main__":
    main()
