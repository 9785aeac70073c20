"""Native DQN, SAC and TD3 agents built on rlweights (coming with their own issue)."""
