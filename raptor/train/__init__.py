"""Training: the Lightning distillation module (`fit`), losses, schedules, checkpoints,
runs and loggers, preemption, teacher training, backbone export."""
