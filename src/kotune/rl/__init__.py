"""Online reinforcement learning: rewards, rollouts and the GRPO policy loss."""
