"""`python -m utils.score RUN_DIR [RUN_DIR ...]`: score runs against a truth (utils/evaluation/score.py)."""
from .core.cli import run
from .evaluation.score import main

if __name__ == "__main__":
    run(main)
