"""Prefect flows over the fedilora tasks, and the ``fedilora`` command line.

Offline and private by default: no hub downloads, no analytics from Prefect, MLflow or DVC.
These defaults are set before any of those libraries is imported.
"""

import os

for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Prefect's temporary local server can take longer than its default 20 s to start on a busy
    # 2-core machine (pyproject.toml says the same for runs in this folder)
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}.items():
    os.environ.setdefault(_name, _value)
