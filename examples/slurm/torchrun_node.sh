#!/bin/bash
# One per node (train.sbatch: srun --ntasks-per-node=1 bash torchrun_node.sh TRAINER ARGS...).
# Starts torchrun for this node's workers; all nodes meet in a c10d rendezvous on HEAD_ADDR.
# Runs on the host or inside the pyxis container alike: it needs bash and python with torch, no SLURM tools.
#
# Environment (exported by train.sbatch): NNODES NPROC_PER_NODE HEAD_ADDR RDZV_PORT NODE_ADDRS
# ("node=address ..."), PYTHON, EXTRA_TORCHRUN_ARGS; from SLURM: SLURM_NODEID, SLURMD_NODENAME,
# SLURM_JOB_ID.
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
#    torchrun's handled set (--signals-to-handle / PET_SIGNALS_TO_HANDLE, torch >= 2.9) leaves the
#    inherited SIG_IGN in place. Older torch ignores the variable: SIGUSR1 still works, SIGTERM
#    keeps the 30 s behaviour (warned below).
# SIG_IGN survives exec, but not a program in between that installs its own handler (coreutils
# `timeout`, for one, hands its child the default action): run torchrun directly from here.
# This bash stays as torchrun's parent (ignoring both too) to report how it ended. (torchrun runs
# in the foreground: bash would make a background job ignore SIGINT/SIGQUIT as well.)
trap '' USR1 TERM
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGINT,SIGHUP,SIGQUIT}
PYTHON=${PYTHON:-python}
torch_version=$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || echo unknown)
IFS=. read -r t_major t_minor _ <<< "$torch_version"
if [[ $t_major =~ ^[0-9]+$ && $t_minor =~ ^[0-9]+$ ]] && (( t_major < 2 || (t_major == 2 && t_minor < 9) )); then
    echo "torchrun_node.sh: WARNING: torch ${torch_version} < 2.9 has no --signals-to-handle: on SIGTERM" \
         "torchrun kills the workers 30 s later and exits 1 (SIGUSR1 pre-emption is unaffected)" >&2
fi

echo "[$(date -u +%FT%TZ)] torchrun_node.sh: node ${node} (${local_addr}) is node ${node_rank} of ${NNODES}:" \
     "${NPROC_PER_NODE} workers, rendezvous ${HEAD_ADDR}:${RDZV_PORT} (host: ${is_host}), torch ${torch_version}"

# torchrun is `python -m torch.distributed.run`: the same interpreter as the workers, found the same
# way on the host and in a container (no PATH assumptions).
# shellcheck disable=SC2086
"$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$HEAD_ADDR:$RDZV_PORT" --rdzv-id "${SLURM_JOB_ID:-phi4}" \
    --rdzv-conf "is_host=${is_host}" --local-addr "$local_addr" \
    --max-restarts 0 ${EXTRA_TORCHRUN_ARGS:-} \
    "$@"
rc=$?
echo "[$(date -u +%FT%TZ)] torchrun_node.sh: node ${node}: torchrun exited ${rc}"
exit "$rc"
