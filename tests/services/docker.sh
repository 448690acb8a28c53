#!/usr/bin/env bash
# A Docker engine on this host for the training image's tests (tests/test_image.py) and builds.
#
#   tests/services/docker.sh up       install docker.io + docker-compose if missing, start
#                                     dockerd unless one answers, wait until it does
#   tests/services/docker.sh status   show the daemon; exit 1 unless it answers
#   tests/services/docker.sh down     stop the dockerd started by `up` (images are kept)
#
# `up` is idempotent: a daemon that already answers (started by `up` before, by systemd or by
# hand) is used as it is. It says on stderr what it started; stdout stays empty, so
# `eval "$(tests/services/docker.sh up)"` works as with tests/services/slurm.sh.
#
# Environment:
#   DOCKER_TEST_DIR   pid file and log of the dockerd started here (default /tmp/recipes-docker)
#
# The machines this project runs on (Debian 12, root, no systemd) have no bridge networking or
# iptables for containers, so dockerd runs with --iptables=false --bridge=none and every
# container, builds included, uses the host's network (--network host). The daemon keeps its
# images in /var/lib/docker, so the image build cache outlives `down` and this script.
set -euo pipefail

DIR="${DOCKER_TEST_DIR:-/tmp/recipes-docker}"
PIDFILE="$DIR/dockerd.pid"
LOG="$DIR/dockerd.log"
UP_TIMEOUT_S=60

log() { printf 'docker.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

answers() { docker info >/dev/null 2>&1; }

ours_alive() { # the dockerd started by `up` is running (not some process that reused its pid)
  [[ -s "$PIDFILE" ]] || return 1
  local pid
  pid=$(cat "$PIDFILE")
  [[ -r /proc/$pid/comm && $(cat "/proc/$pid/comm") == dockerd ]]
}

install_packages() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v docker-compose >/dev/null || missing+=(docker-compose)
  ((${#missing[@]} == 0)) && return 0
  [[ $(id -u) == 0 ]] || die "missing ${missing[*]}; run as root or: apt-get install ${missing[*]}"
  log "installing ${missing[*]}"
  local apt=(apt-get -y -q -o DPkg::Lock::Timeout=300 --no-install-recommends)
  export DEBIAN_FRONTEND=noninteractive
  if ! "${apt[@]}" install "${missing[@]}" >"$DIR/apt.log" 2>&1; then
    log "apt-get install failed; running apt-get update and retrying"
    apt-get -q -o DPkg::Lock::Timeout=300 update >>"$DIR/apt.log" 2>&1 \
      || die "apt-get update failed, see $DIR/apt.log"
    "${apt[@]}" install "${missing[@]}" >>"$DIR/apt.log" 2>&1 \
      || die "apt-get install ${missing[*]} failed, see $DIR/apt.log"
  fi
}

start_dockerd() {
  [[ $(id -u) == 0 ]] || die "the Docker daemon is not running and starting it needs root"
  # setsid: the daemon outlives this script's session (CI ends the shell that ran `up`).
  setsid dockerd --iptables=false --bridge=none --pidfile "$PIDFILE" \
    </dev/null >>"$LOG" 2>&1 &
  local deadline=$((SECONDS + UP_TIMEOUT_S))
  until answers; do
    if ! kill -0 $! 2>/dev/null; then
      tail -n 20 "$LOG" >&2
      die "dockerd exited, see $LOG"
    fi
    ((SECONDS < deadline)) || die "dockerd does not answer after ${UP_TIMEOUT_S}s, see $LOG"
    sleep 0.5
  done
  log "up: started dockerd (pid $(cat "$PIDFILE"), log $LOG)"
}

cmd_up() {
  mkdir -p "$DIR"
  install_packages
  if answers; then
    if ours_alive; then
      log "up: dockerd already running (pid $(cat "$PIDFILE"), started by this script)"
    else
      log "up: a Docker daemon already answers (not started by this script); using it"
    fi
  else
    start_dockerd
  fi
  log "server $(docker version --format '{{.Server.Version}}'), storage $(docker info \
    --format '{{.Driver}}'); run containers with --network host"
}

cmd_status() {
  if ! answers; then
    echo "dockerd: not answering"
    return 1
  fi
  if ours_alive; then
    echo "dockerd: running (pid $(cat "$PIDFILE"), started by tests/services/docker.sh)"
  else
    echo "dockerd: running (not started by tests/services/docker.sh)"
  fi
  docker version --format 'server {{.Server.Version}}, client {{.Client.Version}}'
}

cmd_down() {
  if ! ours_alive; then
    log "down: no dockerd started by this script is running; nothing to stop"
    return 0
  fi
  local pid
  pid=$(cat "$PIDFILE")
  kill "$pid"
  for _ in $(seq 1 150); do
    kill -0 "$pid" 2>/dev/null || { log "down: stopped dockerd (pid $pid)"; return 0; }
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
  log "down: dockerd (pid $pid) killed after 15 s"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) die "usage: $0 up|down|status" ;;
esac
