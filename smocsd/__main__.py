import sys

from .app.cli import main

# Guarded: a training cycle's child process (multiprocessing "spawn") may import the
# main module again, and must not start a second smocsd in it.
if __name__ == "__main__":
    sys.exit(main())
