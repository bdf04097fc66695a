"""Our PPO on Accelerate: pure maths in `advantages`/`losses`, rollouts and the update loop beside them."""
