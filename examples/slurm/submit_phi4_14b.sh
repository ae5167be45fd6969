#!/bin/bash
# Submit the stages of examples/recipes/phi4_14b.yaml, each as its own job of train.sbatch with the
# size and layout that stage needs (H100 80 GB nodes with 8 GPUs; docs/parallelism.md has the
# memory arithmetic behind each layout, docs/operations.md the rest).
#
#   examples/slurm/submit_phi4_14b.sh pretrain                  # one stage
#   examples/slurm/submit_phi4_14b.sh all                       # the five, each after the previous succeeded
#   examples/slurm/submit_phi4_14b.sh sft stages.sft.optim.lr=2e-6     # extra recipe overrides
#   DRY_RUN=1 examples/slurm/submit_phi4_14b.sh all             # print the sbatch commands only
#
# Stage      nodes  time      layout (tp x pp x dp)                                    why
# pretrain   240    48:00:00  2 x 4 x 240, SP, interleaved 1F1B (v=2), pp_head_cost 2  Phi-4's 1,920 GPUs; 24 micro-batches of 4K per replica
# midtrain   120    24:00:00  2 x 1 x 480, SP, full recompute                          16K context: activations x4; 3 micro-batches per replica
# sft         16    12:00:00  2 x 1 x 64, SP, full recompute                           512 x 16K per step; 8 micro-batches per replica
# dpo1/dpo2   16    06:00:00  2 x 1 x 64, SP, full recompute                           256 pairs x 16K (+ frozen reference); 4 per replica
# Node counts and times are choices, not published values: the job requeues itself at its time
# limit, so the time only has to fit your partition. Every stage resumes from `latest` under
# RUN_DIR, or starts from the previous stage's final checkpoint (init_from: previous).
#
# Environment: RUN_DIR (SHARED storage for checkpoints, metrics and these jobs' logs; default the
# recipe's /checkpoints/phi4_14b), REPO (this checkout, visible on every node), NODES / TIME
# (override the table, single stage only), GPUS_PER_NODE (8), SBATCH_ARGS (e.g. "--partition=gpu
# --account=llm"), CONTAINER_IMAGE / CONTAINER_MOUNTS (pyxis; see train.sbatch), DRY_RUN=1.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=${REPO:-$(cd "$HERE/../.." && pwd)}
RECIPE=${RECIPE:-$REPO/examples/recipes/phi4_14b.yaml}
RUN_DIR=${RUN_DIR:-/checkpoints/phi4_14b}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
LOG_DIR=${LOG_DIR:-$RUN_DIR/logs}
STAGES=(pretrain midtrain sft dpo1 dpo2)

stage_plan() {  # -> "nodes time override..."
    case $1 in
        pretrain) echo "240 48:00:00 parallel.tp=2 parallel.pp=4 parallel.pp_schedule=interleaved_1f1b" \
                       "parallel.virtual_stages=2 parallel.pp_head_cost=2" ;;
        midtrain) echo "120 24:00:00 parallel.tp=2 parallel.recompute=full" ;;
        sft) echo "16 12:00:00 parallel.tp=2 parallel.recompute=full" ;;
        dpo1 | dpo2) echo "16 06:00:00 parallel.tp=2 parallel.recompute=full" ;;
        *) return 1 ;;
    esac
}

(( $# >= 1 )) || { sed -n '2,9p' "$0"; exit 2; }
what=$1; shift
if [[ $what == all ]]; then
    selected=("${STAGES[@]}")
    [[ -z ${NODES:-}${TIME:-} ]] || { echo "submit_phi4_14b.sh: NODES/TIME apply to a single stage, not 'all'" >&2; exit 2; }
elif stage_plan "$what" >/dev/null; then
    selected=("$what")
else
    echo "submit_phi4_14b.sh: unknown stage '$what'; expected one of: ${STAGES[*]} all" >&2; exit 2
fi

[[ -n ${DRY_RUN:-} ]] || mkdir -p "$LOG_DIR"
previous=""
for stage in "${selected[@]}"; do
    read -r nodes time layout <<< "$(stage_plan "$stage")"
    # shellcheck disable=SC2206
    cmd=(sbatch --parsable --job-name="phi4-$stage" --nodes="${NODES:-$nodes}" --gpus-per-node="$GPUS_PER_NODE"
         --time="${TIME:-$time}" --output="$LOG_DIR/%x-%j.out"
         --export="ALL,RECIPE=$RECIPE,STAGE=$stage,RUN_DIR=$RUN_DIR,REPO=$REPO,NPROC_PER_NODE=$GPUS_PER_NODE"
         ${previous:+--dependency=afterok:$previous} ${SBATCH_ARGS:-}
         "$HERE/train.sbatch" $layout "$@")
    echo "${cmd[*]}" >&2
    if [[ -n ${DRY_RUN:-} ]]; then
        previous="<$stage>"
    else
        previous=$("${cmd[@]}")
        previous=${previous%%;*}
        echo "$stage: job $previous"
    fi
done
