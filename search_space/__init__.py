"""The space of `ArchSpec`s: choices, sampling from an Optuna trial, analytic costs."""
