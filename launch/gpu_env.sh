# GPU performance settings, in one place (sourced by slurm_gpu.sbatch and the GKE manifest's
# image entry; `source launch/gpu_env.sh` by hand elsewhere). Anything already in XLA_FLAGS stays
# and comes first; a flag given twice takes its last value, so the user's own come last:
#   MMJAX_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=false" source launch/gpu_env.sh
#
# latency hiding scheduler: overlaps collectives (the FSDP all-gathers / reduce-scatters) with
#   compute; pipelined all-gather / reduce-scatter / all-reduce: the same across scanned layers;
# combine thresholds: fewer, larger collectives (128 MiB) instead of one per tensor;
# command buffers off: XLA's CUDA graphs cost memory and start-up for little gain on large steps.
# cuDNN (flash) attention is a model setting, not a flag: model.attention="cudnn" (README).
gpu_flags=(
  --xla_gpu_enable_latency_hiding_scheduler=true
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  --xla_gpu_enable_command_buffer=
)
export XLA_FLAGS="${XLA_FLAGS:-} ${gpu_flags[*]} ${MMJAX_XLA_FLAGS:-}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
