"""The search: objectives, quality proxies, the Optuna study, Ray orchestration, the CLI."""
