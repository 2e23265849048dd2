"""`python -m utils.simulate`: the demo tissue simulator's command line (utils/simulate/simulation.py)."""
from ..core.cli import run
from .simulation import main

run(main)
