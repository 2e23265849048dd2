"""`python -m utils.simulate`: the demo tissue simulator's command line (utils/simulate/cli.py)."""
from ..core.cli import run
from .cli import main

run(main)
