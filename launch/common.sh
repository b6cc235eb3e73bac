# Shared by the launch scripts: printing and running commands, with --dry-run.
# A command is shown as a copy-pasteable shell line: arguments with spaces or shell characters are quoted.

DRY_RUN=${DRY_RUN:-0}

# quote ARG: ARG as the shell reads it back, quoted only when it needs to be.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"; else printf '%s' "${1@Q}"; fi
}

show() {
  local out="" a
  for a in "$@"; do out+="$(quote "$a") "; done
  printf '%s\n' "${out% }"
}

# run CMD...: print it (dry run) or run it, stopping the script when it fails.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then show "$@"; else "$@"; fi
}

die() { echo "$(basename "$0"): $*" >&2; exit 2; }
