"""Serve entry point for `ray job submit -- python jobs/serve_app.py --gpt CKPT --resnet CKPT --host 0.0.0.0`
(listening beyond loopback needs the API key in the job's environment: BIGRAY_API_KEY).

The same arguments as `bigray serve` (`--config`, `--set`, `--port`, ...), but it returns once the
app is deployed: the app keeps running on the cluster.
"""

import sys

from bigray.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "--detach", *sys.argv[1:]]))
