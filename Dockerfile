# The image every bigray node runs: cluster.yaml's docker section and both KubeRay manifests.
#
# Ray 2.60.0 on Python 3.11 with CUDA 13.0: the CUDA build of torch 2.14.1 that constraints.txt
# pins (hosts need an NVIDIA driver >= 580 for CUDA 13.0). The lock file pins everything else.
#   docker build -t YOUR-REGISTRY/bigray:0.1.0 .
#   docker push YOUR-REGISTRY/bigray:0.1.0
# The head and Serve-only nodes run the same image (no GPU is needed to run it); a smaller
# CPU-only image would need a CPU torch wheel, which the lock does not pin.
FROM rayproject/ray:2.60.0-py311-cu130

WORKDIR /home/ray/bigray
COPY --chown=ray:users pyproject.toml constraints.txt README.md ./
COPY --chown=ray:users bigray ./bigray
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users serve ./serve

# torch first, then DeepSpeed built against it with its CPU Adam op compiled now (optimizer offload
# uses it; without offload bigray steps torch's fused AdamW and needs no compiled op), then bigray
# and every pinned dependency.
RUN pip install --no-cache-dir -c constraints.txt torch==2.14.1 \
    && DS_BUILD_CPU_ADAM=1 pip install --no-cache-dir --no-build-isolation -c constraints.txt deepspeed==0.19.8 \
    && pip install --no-cache-dir -c constraints.txt . \
    && python -c "import bigray, ray, torch, deepspeed; assert ray.__version__ == '2.60.0', ray.__version__"

ENV RAY_TRAIN_V2_ENABLED=1
