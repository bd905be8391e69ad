"""Diffusion objectives, schedules and solvers (pure functions)."""
