"""Pareto fronts, hypervolume, HTML dashboards, read from Optuna studies."""
