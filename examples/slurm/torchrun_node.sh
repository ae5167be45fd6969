#!/bin/bash
# One per node (train.sbatch: srun --ntasks-per-node=1 bash torchrun_node.sh TRAINER ARGS...).
# Starts torchrun for this node's workers; all nodes meet in a c10d rendezvous on HEAD_ADDR.
# Runs on the host or inside the pyxis container alike: it needs bash and torchrun, no SLURM tools.
#
# Environment (exported by train.sbatch): NNODES NPROC_PER_NODE HEAD_ADDR RDZV_PORT NODE_ADDRS
# ("node=address ..."), EXTRA_TORCHRUN_ARGS; from SLURM: SLURM_NODEID, SLURMD_NODENAME, SLURM_JOB_ID.
set -uo pipefail
: "${NNODES:?}" "${NPROC_PER_NODE:?}" "${HEAD_ADDR:?}" "${RDZV_PORT:?}"

node=${SLURMD_NODENAME:-$(hostname -s)}
node_rank=${SLURM_NODEID:?not inside an srun step}
local_addr=""
for pair in ${NODE_ADDRS:-}; do
    [[ ${pair%%=*} == "$node" ]] && local_addr=${pair#*=}
done
local_addr=${local_addr:-$node}
# The first node hosts the rendezvous store; say so explicitly (torchrun's own guess compares
# host names and fails when the endpoint is an address, e.g. on loopback test clusters).
is_host=$([[ $node_rank == 0 ]] && echo 1 || echo 0)

# ---- signals -------------------------------------------------------------------------------------
# SLURM signals every process of the step. The workers (the trainer) turn SIGUSR1/SIGTERM into
# "save a checkpoint, exit 0". torchrun must stay out of the way and simply see its workers finish:
#  * SIGUSR1 is not one of torchrun's handled signals, so by default it would kill torchrun at once
#    and leave the workers unsupervised. Ignoring it here makes torchrun inherit SIG_IGN (the
#    workers inherit it too, until the trainer installs its handler first thing at start-up).
#  * SIGTERM is handled by torchrun by default: it re-sends SIGTERM to the workers, SIGKILLs them
#    30 s later (shorter than a 14B save) and exits 1 with a traceback. Taking SIGTERM out of
#    torchrun's handled set (PET_SIGNALS_TO_HANDLE, torch >= 2.9; older torch ignores the variable
#    and keeps the 30 s behaviour) leaves the inherited SIG_IGN in place.
# This bash stays as torchrun's parent (ignoring both too) to report how it ended. (torchrun runs
# in the foreground: bash would make a background job ignore SIGINT/SIGQUIT as well.)
trap '' USR1 TERM
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGINT,SIGHUP,SIGQUIT}

echo "[$(date -u +%FT%TZ)] torchrun_node.sh: node ${node} (${local_addr}) is node ${node_rank} of ${NNODES}:" \
     "${NPROC_PER_NODE} workers, rendezvous ${HEAD_ADDR}:${RDZV_PORT} (host: ${is_host})"

# shellcheck disable=SC2086
torchrun \
    --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$HEAD_ADDR:$RDZV_PORT" --rdzv-id "${SLURM_JOB_ID:-phi4}" \
    --rdzv-conf "is_host=${is_host}" --local-addr "$local_addr" \
    --max-restarts 0 ${EXTRA_TORCHRUN_ARGS:-} \
    "$@"
rc=$?
echo "[$(date -u +%FT%TZ)] torchrun_node.sh: node ${node}: torchrun exited ${rc}"
exit "$rc"
