"""The application wing: command line, pipeline, Hugging Face glue, tasks, plots.

It drives the core (``flaplace.*``); the core never imports it.
"""
