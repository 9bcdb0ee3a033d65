# shellcheck shell=bash
# Helpers shared by launch/gpu.sh and launch/tpu.sh (sourced; not run on its own).
# The sourcing script sets DRY_RUN (0/1) and SCRIPT (its name, for messages).

# Shell-quote words, joined by single spaces.
quote_words() {
  local out="" w
  for w in "$@"; do
    out+="${out:+ }$(printf '%q' "$w")"
  done
  printf '%s' "$out"
}

die() { echo "$SCRIPT: $*" >&2; exit 2; }

# Print (dry run) or execute a command given as words.
do_cmd() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%s\n' "$(quote_words "$@")"
  else
    "$@"
  fi
}
