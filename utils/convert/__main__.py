"""`python -m utils.convert`: the converters' command line (utils/convert/cli.py)."""
from ..core.cli import run
from .cli import main

run(main)
