#!/usr/bin/env bash
# A real, private Slurm cluster on this host for the Slurm backend's tests and for demos.
#
#   tests/services/slurm.sh up       install slurm-wlm + munge if missing, start munged,
#                                    slurmctld and two slurmd (nodes n1, n2), wait until idle
#   tests/services/slurm.sh status   show the daemons and sinfo; exit 1 unless all are up
#   tests/services/slurm.sh down     stop the daemons started by `up` (files are kept)
#
# Clients need SLURM_CONF: `up` prints the export line and writes it to $SLURM_TEST_DIR/env.sh,
#   eval "$(tests/services/slurm.sh up)"      or      . /tmp/recipes-slurm/env.sh
#
# Environment:
#   SLURM_TEST_DIR   private directory for config, munge key/socket, state, spool, logs
#                    (default /tmp/recipes-slurm)
#   SLURM_TEST_PORT  slurmctld port; the two slurmd use the next two (default 16817)
#
# Everything runs as root without systemd or cgroups (measured on the Debian 12 machines this project runs on). Both
# slurmd run on 127.0.0.1 (Debian builds Slurm with MULTIPLE_SLURMD), so a --nodes=2 job
# runs one task per "node" on this host. Jobs inherit the submitting shell's environment
# (sbatch --export=ALL), so the python on the submitter's PATH is the one the job runs.
set -euo pipefail

DIR="${SLURM_TEST_DIR:-/tmp/recipes-slurm}"
CTLD_PORT="${SLURM_TEST_PORT:-16817}"
NODES=(n1 n2)
CONF="$DIR/slurm.conf"
MUNGE_SOCKET="$DIR/munge/munge.socket.2"
UP_TIMEOUT_S=60

log() { printf 'slurm.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

pid_alive() { # <pid file>: the daemon it names is running (not some process that reused the pid)
  [[ -s "$1" ]] || return 1
  local pid name
  pid=$(cat "$1")
  name=$(basename "$1" .pid)
  [[ -r /proc/$pid/comm && $(cat "/proc/$pid/comm") == "${name%%-*}" ]]
}

install_packages() {
  local missing=()
  command -v munged >/dev/null || missing+=(munge)
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  ((${#missing[@]} == 0)) && return 0
  [[ $(id -u) == 0 ]] || die "missing ${missing[*]}; run as root or: apt-get install slurm-wlm munge"
  log "installing slurm-wlm munge (missing: ${missing[*]})"
  local apt=(apt-get -y -q -o DPkg::Lock::Timeout=300 --no-install-recommends)
  export DEBIAN_FRONTEND=noninteractive
  if ! "${apt[@]}" install slurm-wlm munge >"$DIR/apt.log" 2>&1; then
    log "apt-get install failed; running apt-get update and retrying"
    apt-get -q -o DPkg::Lock::Timeout=300 update >>"$DIR/apt.log" 2>&1 \
      || die "apt-get update failed, see $DIR/apt.log"
    "${apt[@]}" install slurm-wlm munge >>"$DIR/apt.log" 2>&1 \
      || die "apt-get install slurm-wlm munge failed, see $DIR/apt.log"
  fi
}

render_conf() { # <cpus> <real memory MB>
  cat <<EOF
# Written by tests/services/slurm.sh: a private two-node cluster on 127.0.0.1.
ClusterName=recipes
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
# Quick turnaround for tests: cancelled steps are killed 2 s after SIGTERM.
KillWait=2
InactiveLimit=0
MinJobAge=600
NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[$((CTLD_PORT + 1))-$((CTLD_PORT + 2))] CPUs=$1 RealMemory=$2 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
}

write_files() {
  mkdir -p "$DIR"/{munge,state,spool,run,log}
  chmod 700 "$DIR/munge"
  if [[ ! -s "$DIR/munge/munge.key" ]]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  fi
  chmod 600 "$DIR/munge/munge.key"
  local mem_mb
  mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 / 2)}' /proc/meminfo)
  render_conf "$(nproc)" "$mem_mb" >"$CONF"
  printf 'export SLURM_CONF=%s\n' "$CONF" >"$DIR/env.sh"
}

start_munged() {
  pid_alive "$DIR/run/munged.pid" && return 0
  munged --force --key-file="$DIR/munge/munge.key" --socket="$MUNGE_SOCKET" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
    --seed-file="$DIR/munge/munged.seed" </dev/null >>"$DIR/log/munged.log" 2>&1 \
    || die "munged did not start, see $DIR/log/munged.log"
}

start_slurmctld() {
  pid_alive "$DIR/run/slurmctld.pid" && return 0
  slurmctld -i -f "$CONF" </dev/null >>"$DIR/log/slurmctld.log" 2>&1 \
    || die "slurmctld did not start, see $DIR/log/slurmctld.log"
}

start_slurmd() { # <node name>
  pid_alive "$DIR/run/slurmd-$1.pid" && return 0
  slurmd -N "$1" -f "$CONF" </dev/null >>"$DIR/log/slurmd-$1.log" 2>&1 \
    || die "slurmd -N $1 did not start, see $DIR/log/slurmd-$1.log"
}

nodes_idle() {
  local states
  states=$(sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
  for node in "${NODES[@]}"; do
    grep -Eq "^$node (idle|alloc|mix)\$" <<<"$states" || return 1
  done
}

wait_idle() {
  local deadline=$((SECONDS + UP_TIMEOUT_S))
  until nodes_idle; do
    ((SECONDS < deadline)) || {
      sinfo -N >&2 || true
      die "nodes not idle after ${UP_TIMEOUT_S}s, see logs in $DIR/log"
    }
    sleep 0.5
  done
}

cmd_up() {
  mkdir -p "$DIR"
  install_packages
  export SLURM_CONF="$CONF"
  if ! all_running; then
    write_files
    start_munged
    start_slurmctld
    for node in "${NODES[@]}"; do start_slurmd "$node"; done
  fi
  wait_idle
  log "up: nodes ${NODES[*]} idle (config $CONF)"
  cat "$DIR/env.sh"
}

all_running() {
  local pidfile
  for pidfile in munged slurmctld "${NODES[@]/#/slurmd-}"; do
    pid_alive "$DIR/run/$pidfile.pid" || return 1
  done
}

cmd_status() {
  local pidfile rc=0
  for pidfile in munged slurmctld "${NODES[@]/#/slurmd-}"; do
    if pid_alive "$DIR/run/$pidfile.pid"; then
      echo "$pidfile: running (pid $(cat "$DIR/run/$pidfile.pid"))"
    else
      echo "$pidfile: stopped"
      rc=1
    fi
  done
  if ((rc == 0)); then
    SLURM_CONF="$CONF" sinfo -N || rc=1
  fi
  return "$rc"
}

any_alive() { # <pid>...
  local pid
  for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 0; done
  return 1
}

stop_daemons() { # <daemon>...: SIGTERM them all, then wait (SIGKILL after 10 s)
  local daemon pids=()
  for daemon in "$@"; do
    pid_alive "$DIR/run/$daemon.pid" && pids+=("$(cat "$DIR/run/$daemon.pid")")
  done
  ((${#pids[@]})) || return 0
  kill "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 1 100); do
    any_alive "${pids[@]}" || return 0
    sleep 0.1
  done
  kill -9 "${pids[@]}" 2>/dev/null || true
}

cmd_down() {
  # The Slurm daemons first (they use munge while shutting down), munged last.
  stop_daemons slurmctld "${NODES[@]/#/slurmd-}"
  stop_daemons munged
  log "down (files kept in $DIR)"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) die "usage: $0 up|down|status" ;;
esac
