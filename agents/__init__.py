"""Native RL agents built on rlweights: DQN (``agents.dqn``), SAC (``agents.sac``) and TD3
(``agents.td3``), the training loop with evaluation, checkpoints and resume
(``agents.train``), the SB3 counterpart (``agents.sb3_train``) and the ``rlweights train`` /
``rlweights evaluate`` commands (``agents.cli``).

>>> from agents.train import make_config, train
>>> agent, summary = train(make_config("sac", total_steps=10_000), "runs/my-sac")
"""
