# The image every bigray node runs: cluster.yaml's docker section and both KubeRay manifests.
#
# Ray 2.60.0 on Python 3.11 with CUDA 13.0: the CUDA build of torch 2.14.1 that constraints.txt
# pins (hosts need an NVIDIA driver >= 580 for CUDA 13.0). The lock file pins everything else.
#   docker build -t YOUR-ACCOUNT.dkr.ecr.us-west-2.amazonaws.com/bigray:0.1.0 .
#   docker push YOUR-ACCOUNT.dkr.ecr.us-west-2.amazonaws.com/bigray:0.1.0   (README: ECR)
# The head and Serve-only nodes run the same image (no GPU is needed to run it); a smaller
# CPU-only image would need a CPU torch wheel, which the lock does not pin.
FROM rayproject/ray:2.60.0-py311-cu130

# EFA for NCCL between p5 nodes: libfabric and the aws-ofi-nccl plugin from AWS's EFA installer,
# user space only (the host's AMI has the kernel module; the container gets /dev/infiniband).
# Without them NCCL falls back to TCP sockets between nodes.
ARG EFA_INSTALLER_VERSION=1.43.1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
USER 0
WORKDIR /tmp/efa
RUN curl -fsSL "https://efa-installer.amazonaws.com/aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz" | tar -xz
WORKDIR /tmp/efa/aws-efa-installer
RUN ./efa_installer.sh -y --skip-kmod --skip-limit-conf --no-verify && rm -rf /tmp/efa
ENV LD_LIBRARY_PATH=/opt/amazon/ofi-nccl/lib:/opt/amazon/efa/lib:${LD_LIBRARY_PATH}
USER 1000:100

WORKDIR /home/ray/bigray
COPY --chown=ray:users pyproject.toml constraints.txt README.md ./
COPY --chown=ray:users bigray ./bigray
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users serve ./serve

# torch first, then DeepSpeed built against it with its CPU Adam op compiled now (optimizer offload
# uses it; without offload bigray steps torch's fused AdamW and needs no compiled op), then bigray
# and every pinned dependency. `docker build` has no GPU, so DeepSpeed would pick its "cpu"
# accelerator and build the op for it: DS_ACCELERATOR=cuda builds the one GPU nodes load, and
# ds_report must list it as installed.
RUN pip install --no-cache-dir -c constraints.txt torch==2.14.1 \
    && DS_ACCELERATOR=cuda DS_BUILD_CPU_ADAM=1 pip install --no-cache-dir --no-build-isolation -c constraints.txt deepspeed==0.19.8 \
    && pip install --no-cache-dir -c constraints.txt . \
    && python -c "import bigray, ray, torch, deepspeed; assert ray.__version__ == '2.60.0', ray.__version__" \
    && DS_ACCELERATOR=cuda ds_report | grep -E "^cpu_adam .*\[YES\]"

ENV RAY_TRAIN_V2_ENABLED=1
