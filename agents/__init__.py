"""Native RL agents built on rlweights: DQN (``rlweights.agents.dqn``), SAC
(``rlweights.agents.sac``) and TD3 (``rlweights.agents.td3``), from the networks of
``rlweights.agents.networks`` and the shared parts of ``rlweights.agents.common``; the
training loop with evaluation, checkpoints and resume (``rlweights.agents.train``), its SB3
counterpart (``rlweights.agents.sb3_train``), the target-update specs they share
(``rlweights.agents.target_update``) and the ``rlweights train`` / ``rlweights evaluate``
commands (``rlweights.agents.cli``).

>>> from rlweights.agents.train import make_config, train
>>> agent, summary = train(make_config("sac", total_steps=10_000), "runs/my-sac")
"""

from rlweights.extras import require

require("gymnasium", "agents", "rlweights.agents")
