"""Train SAC on Pendulum-v1 (attached to rlweights) with weight drift logged to TensorBoard.

python scripts/drift_demo.py --logdir runs/drift-demo --steps 3000
tensorboard --logdir runs/drift-demo
"""

import argparse

from stable_baselines3 import SAC

from rlweights.sb3 import DriftCallback, attach

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--logdir", default="runs/drift-demo", help="TensorBoard log directory")
parser.add_argument("--steps", type=int, default=3000, help="environment steps (default 3000)")
parser.add_argument("--every", type=int, default=100, help="drift logging interval (100)")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

model = SAC("MlpPolicy", "Pendulum-v1", tensorboard_log=args.logdir, seed=args.seed, device="cpu")
attach(model)
model.learn(args.steps, callback=DriftCallback(every=args.every, histograms=True))
print(f"logged to {args.logdir}; view with: tensorboard --logdir {args.logdir}")
