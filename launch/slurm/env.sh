# CUDA / NCCL / PyTorch environment of a MODUS job on an H100 cluster.
#
# Sourced by train.sbatch on the batch node; srun exports it to every node. Each variable
# keeps a value already set, so a site profile or the submitting shell can override any of
# them. Needs MODUS_GPUS_PER_NODE and MODUS_LOG_DIR (train.sbatch sets both).

# ---------------------------------------------------------------------------------- CUDA

# Megatron-core's tensor / sequence parallelism needs one hardware work queue per GPU so
# collectives run in the order they were issued and overlap with the GEMMs queued before them.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
# Let the caching allocator grow segments in place: packed micro-batches change the size of
# every per-expert gather, which fragments fixed segments. The planner's fragmentation margin
# (bench/calibration/h100.json) assumes this setting.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

# ---------------------------------------------------------------------------------- NCCL

# WARN reports misconfiguration only. For a slow or hanging start use INFO together with
# NCCL_DEBUG_SUBSYS=INIT,NET: it prints the transport and the NICs NCCL chose.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Interface of NCCL's TCP bootstrap: anything but loopback and container bridges. Name the
# management interface (e.g. eth0, or ib0 for IPoIB) when start-up picks the wrong one.
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}"
# InfiniBand verbs timeout, 4.096 us * 2^22 (about 17 s) instead of NCCL's 2^20 (about 4 s):
# at hundreds of nodes, transient fabric congestion otherwise surfaces as fatal IB errors.
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
# Verbs retries before an IB error is fatal (the InfiniBand maximum).
export NCCL_IB_RETRY_CNT="${NCCL_IB_RETRY_CNT:-7}"
# Site-specific, left to the cluster profile:
#   NCCL_IB_HCA=mlx5_0,mlx5_3,...   the compute HCAs when storage NICs share the node
#   NCCL_IB_GID_INDEX=3             RoCE v2 fabrics
#   FI_PROVIDER=efa FI_EFA_USE_DEVICE_RDMA=1   AWS p5 (EFA through the aws-ofi-nccl plugin)

# ------------------------------------------------------------------- torch.distributed

# A failed or timed-out collective aborts its communicator and ends the process: a dead rank
# then ends the job (which can be requeued) instead of hanging every other rank until the
# wall-clock limit. The timeout itself is parallel.collective_timeout_s in the config.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# Flight recorder (on by default, the last 2000 collectives per rank): dump it into the job's
# log directory when a collective times out, so a hang can be traced to the rank and the
# collective that stalled.
export TORCH_NCCL_DUMP_ON_TIMEOUT="${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}"
export TORCH_FR_DUMP_TEMP_FILE="${TORCH_FR_DUMP_TEMP_FILE:-${MODUS_LOG_DIR}/nccl_trace_rank_}"

# ------------------------------------------------------------------------- CPU threads

# Intra-op threads per GPU process: an equal share of the node's CPUs (torchrun would force 1).
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  OMP_NUM_THREADS=$(( ${SLURM_CPUS_ON_NODE:-${MODUS_GPUS_PER_NODE}} / MODUS_GPUS_PER_NODE ))
  export OMP_NUM_THREADS=$(( OMP_NUM_THREADS > 0 ? OMP_NUM_THREADS : 1 ))
fi
