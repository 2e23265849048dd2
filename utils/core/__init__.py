"""What every stage and command shares: options and errors, atomic outputs, locks, manifests, I/O."""
from . import startup

startup.install()  # first, before the heavy imports of whatever imported us (utils/core/startup.py)
