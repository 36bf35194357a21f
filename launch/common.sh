# Shared by the launchers (sourced): dry runs and which exit statuses mean "run again".
#   MMJAX_DRY_RUN=1  print each command (shell-quoted) instead of running it
#   MMJAX_MAX_RESTARTS  how many times a retry loop starts the run again (default 20)
run() {
  if [[ -n ${MMJAX_DRY_RUN:-} ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
# 143: preempted (SIGTERM; the agreed step was saved); 137: killed; 75: a peer was lost
# (mmjax/distributed.py); 255: ssh lost the host. 2 (config error) and 3 (non-finite steps) are
# not retried: the same command would fail the same way.
retryable() {
  case $1 in 75 | 137 | 143 | 255) return 0 ;; *) return 1 ;; esac
}
# `mmjax ARGS` as one shell-quoted string, for a command line run through ssh.
quoted() {
  printf '%q ' "$@"
}
