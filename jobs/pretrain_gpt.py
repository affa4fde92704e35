"""GPT pretraining entry point for `ray job submit -- python jobs/pretrain_gpt.py --config ...`."""

import sys

from bigray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain-gpt", *sys.argv[1:]]))
