"""Evaluation: dataset loaders, metrics and benchmark suites (`ragzip eval <suite>`)."""
