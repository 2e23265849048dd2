"""What a command needs before anything else is imported: a Ctrl-C while a script is still importing
(argparse, torch, timm, scikit-image: about a second) gives one line instead of a traceback. run()
(utils/core/cli.py) takes over from there. Imported first by utils/core/__init__.py, so every script
has it from its first import of the library on."""
import sys


def _interrupted_while_starting(kind, value, tb):
    if issubclass(kind, KeyboardInterrupt):
        print("interrupted while starting: nothing was changed; rerun the same command", file=sys.stderr)
    else:
        sys.__excepthook__(kind, value, tb)


def install() -> None:
    """Only where nobody set a hook of their own (IPython and Jupyter keep theirs)."""
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = _interrupted_while_starting
