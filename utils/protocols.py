"""`python -m utils.protocols make|score ...`: the real-data protocols (utils/evaluation/protocols.py)."""
from .core.cli import run
from .evaluation.protocols import main

if __name__ == "__main__":
    run(main)
