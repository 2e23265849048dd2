"""`python -m utils.cohort`: the pipeline over many sections (utils/cohort/cli.py)."""
from ..core.cli import run
from .cli import main

run(main)
