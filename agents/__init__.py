"""Native RL agents built on rlweights.

So far: ``agents.sac`` (Soft Actor-Critic). DQN, TD3, the training command, checkpoints and
evaluation come with the rest of issue 5.
"""
