"""The application wing: command line, pipeline, Hugging Face glue, tasks, plots.

It drives the core (``flaplace.*``); the core never imports it. `predict_run` (from
[`flaplace.app.predict`][flaplace.app.predict]) loads a finished run and predicts on new data.

Examples:
    >>> from flaplace.app import predict_run
    >>> rows = predict_run("outputs/run", "new.jsonl")  # doctest: +SKIP
"""

from typing import Any

__all__ = ["predict_run"]


def __getattr__(name: str) -> Any:
    if name == "predict_run":  # imported on first use: the app's modules import this package
        from flaplace.app.predict import predict_run

        return predict_run
    raise AttributeError(f"module 'flaplace.app' has no attribute {name!r}")
