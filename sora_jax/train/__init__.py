"""Trainers, optimizer, checkpoints and logging."""
