"""GPT fine-tuning entry point for `ray job submit -- python jobs/finetune_gpt.py --config ...`."""

import sys

from bigray.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune-gpt", *sys.argv[1:]]))
