"""Deploy the Serve app onto the cluster from `ray job submit -- python jobs/serve_app.py --gpt CKPT --resnet CKPT`.

Unlike `bigray serve`, this returns once the app is deployed: the app keeps running on the cluster.
"""

import argparse
import json
import sys

from bigray.cli import setup_logging


def main() -> int:
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--gpt", help="GPT checkpoint (path or URI)")
    p.add_argument("--resnet", help="ResNet checkpoint (path or URI)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights of both models")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per model replica (default 0: CPU)")
    a = p.parse_args()
    if not a.gpt and not a.resnet:
        print("serve_app: give --gpt, --resnet or both", file=sys.stderr)
        return 2
    from bigray.serve.app import AppArgs
    from bigray.serve.launch import deploy

    args = AppArgs(gpt_checkpoint=a.gpt, resnet_checkpoint=a.resnet)
    for deployment in (args.gpt, args.resnet):
        deployment.dtype, deployment.num_gpus = a.dtype, a.num_gpus
    url = deploy(args, a.host, a.port)
    print(json.dumps({"deployed": "bigray", "url": url}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
