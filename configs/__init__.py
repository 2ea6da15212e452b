"""Experiment configs: each module has `get_config()` returning a ConfigDict."""
