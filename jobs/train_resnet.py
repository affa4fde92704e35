"""ResNet training entry point for `ray job submit -- python jobs/train_resnet.py --config ...`."""

import sys

from bigray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-resnet", *sys.argv[1:]]))
