"""Hyperparameter search entry point for `ray job submit -- python jobs/tune.py --config ...`."""

import sys

from bigray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
