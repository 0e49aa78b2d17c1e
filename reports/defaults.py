"""The dashboard's defaults, apart from its server so that `lfm2-nas dashboard --help` (and
every `lfm2-nas` start) reads them without importing Optuna, plotly or `http.server`."""

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_REFRESH_S = 5.0

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "DEFAULT_REFRESH_S"]
