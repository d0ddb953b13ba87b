"""The trainer: loop, step strategies, model wrapping, optimizer and schedule, checkpoints, metrics."""
