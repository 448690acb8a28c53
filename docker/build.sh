#!/usr/bin/env bash
# Build the training image from docker/Dockerfile; the last line printed is the image tag.
#
#   bash docker/build.sh [--cpu] [--tag TAG] [--base IMAGE] [-- <docker build options>]
#
#   (default)  the CUDA image: FROM python:3.11-slim-bookworm, torch's cu128 wheels from
#              download.pytorch.org, the rest of docker/requirements.txt from the package
#              index (tag recipes-train:cu128); needs a registry and the network
#   --cpu      the CPU image the tests run: FROM a Debian base built here (debootstrap from
#              this host's Debian mirror, no registry needed: tag recipes-base:bookworm),
#              with torch's CPU wheel and every other wheel downloaded by this host's pip
#              (its index, certificates and proxy settings) and served to the build on
#              127.0.0.1 (--network host): the build itself uses no index (recipes-train:cpu)
#   --tag      the image tag instead of the default
#   --base     BASE_IMAGE instead of the default (e.g. one with EFA, see the Dockerfile)
#   -- ...     passed to `docker build` (e.g. --network host, --build-arg TORCH_INDEX=cu126)
#
#   IMAGE=$(bash docker/build.sh --cpu | tail -n 1)
#
# Builds are cached: the base image is made once, the wheels are downloaded once per
# requirements (in $RECIPES_DOCKER_CACHE, default ~/.cache/recipes-launcher/docker), and
# Docker's layer cache rebuilds only what changed (an edit of adapter/: the last layers).
# Progress goes to stderr; the Debian base build needs root (debootstrap, installed if missing).
#
# Environment: TORCH_VERSION (default 2.13.0), DEBIAN_MIRROR (default: this host's apt source),
# RECIPES_DOCKER_CACHE, RECIPES_BASE_IMAGE (the Debian base's tag, default
# recipes-base:bookworm), RECIPES_WHEEL_PORT (the wheels' port, default 38123).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${RECIPES_DOCKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/recipes-launcher/docker}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
SUITE=bookworm
BASE_TAG="${RECIPES_BASE_IMAGE:-recipes-base:$SUITE}"
SUITE_PYTHON=3.11 # bookworm's python3: the wheels are for it
BASE_PACKAGES=python3,python3-venv,ca-certificates
WHEEL_PORT="${RECIPES_WHEEL_PORT:-38123}"

log() { printf 'build.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; }

cpu=false
tag=""
base=""
docker_args=()
while (($#)); do
  case "$1" in
    --cpu) cpu=true ;;
    --tag) tag="${2:?--tag needs a value}"; shift ;;
    --base) base="${2:?--base needs a value}"; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; docker_args=("$@"); break ;;
    *) usage; die "unknown option $1" ;;
  esac
  shift
done

command -v docker >/dev/null || die "docker is not installed: bash tests/services/docker.sh up"
docker info >/dev/null 2>&1 || die "the Docker daemon is not reachable: bash tests/services/docker.sh up"

debian_mirror() { # the URI of this host's Debian archive (not -security/-updates)
  if [[ -n "${DEBIAN_MIRROR:-}" ]]; then
    echo "$DEBIAN_MIRROR"
    return
  fi
  local uri
  # deb822 stanzas (URIs:/Suites:) and one-line "deb [options] URI suite ..." entries.
  uri=$(awk '
    function stanza() { if (uris != "" && release && !found) { print uris; found = 1; exit }
                        uris = ""; release = 0 }
    /^[[:space:]]*$/ { stanza() }
    /^URIs:/ { uris = $2 }
    /^Suites:/ { for (i = 2; i <= NF; i++) if ($i !~ /-/) release = 1 }
    /^deb / { line = $0; gsub(/\[[^]]*\]/, "", line); split(line, f, " ")
              if (f[3] !~ /-/ && !found) { print f[2]; found = 1; exit } }
    END { stanza() }
  ' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

build_base() { # a minimal Debian with Python 3 as $BASE_TAG, from the Debian archive
  docker image inspect "$BASE_TAG" >/dev/null 2>&1 && return 0
  [[ $(id -u) == 0 ]] || die "building $BASE_TAG needs root (debootstrap); or pass --base IMAGE"
  if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    local apt=(apt-get -y -q -o DPkg::Lock::Timeout=300 --no-install-recommends)
    export DEBIAN_FRONTEND=noninteractive
    if ! "${apt[@]}" install debootstrap >&2; then
      log "apt-get install failed; running apt-get update and retrying"
      apt-get -q -o DPkg::Lock::Timeout=300 update >&2 || die "apt-get update failed"
      "${apt[@]}" install debootstrap >&2 || die "apt-get install debootstrap failed"
    fi
  fi
  local mirror rootfs
  mirror=$(debian_mirror)
  rootfs=$(mktemp -d "${TMPDIR:-/tmp}/recipes-base.XXXXXX")
  log "building $BASE_TAG: debootstrap $SUITE from $mirror (about a minute)"
  local start=$SECONDS
  if ! debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$rootfs" "$mirror" \
    >"$rootfs.log" 2>&1; then
    tail -n 20 "$rootfs.log" >&2
    rm -rf "$rootfs"
    die "debootstrap failed (log: $rootfs.log); set DEBIAN_MIRROR to a reachable Debian mirror"
  fi
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/*
  tar -C "$rootfs" --numeric-owner -c . | docker import --change 'CMD ["bash"]' - "$BASE_TAG" >&2
  rm -rf "$rootfs" "$rootfs.log"
  log "built $BASE_TAG in $((SECONDS - start)) s"
}

python_version() { # <image>: its python3's major.minor
  docker run --rm --network none "$1" python3 -c \
    'import sys; print("%d.%d" % sys.version_info[:2])'
}

download_wheels() { # <python version>: the wheel folder for it, downloaded once
  local key dir tmp
  key=$(cat "$REPO/docker/requirements.txt" <(echo "torch==$TORCH_VERSION+cpu py$1") \
    | sha256sum | cut -c1-16)
  dir="$CACHE/wheels-$key"
  if [[ ! -f "$dir/.complete" ]]; then
    log "downloading wheels for Python $1 into $dir"
    local start=$SECONDS
    tmp="$dir.partial"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    python3 -m pip download --quiet --dest "$tmp" --only-binary=:all: --python-version "$1" \
      "torch==$TORCH_VERSION+cpu" -r "$REPO/docker/requirements.txt" >&2 \
      || die "pip download failed; torch's CPU wheel comes from the PyTorch index: set" \
        "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu (or a --find-links holding it)"
    touch "$tmp/.complete"
    rm -rf "$dir"
    mv "$tmp" "$dir"
    log "downloaded the wheels in $((SECONDS - start)) s"
  fi
  echo "$dir"
}

serve_wheels() { # <wheel dir>: serve it on 127.0.0.1 for the build; sets wheel_url
  # A fixed port keeps the URL, and so the build argument and the layer cache, the same from
  # one build to the next; the next ports are tried when it is taken.
  local port
  for port in $(seq "$WHEEL_PORT" $((WHEEL_PORT + 20))); do
    python3 -m http.server "$port" --bind 127.0.0.1 --directory "$1" >/dev/null 2>&1 &
    server_pid=$!
    for _ in $(seq 1 50); do
      if ! kill -0 "$server_pid" 2>/dev/null; then break; fi # port taken: it exited
      if python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/', timeout=1)" \
        2>/dev/null; then
        wheel_url="http://127.0.0.1:$port/"
        return 0
      fi
      sleep 0.1
    done
    kill "$server_pid" 2>/dev/null || true
    server_pid=""
  done
  die "could not serve $1 on 127.0.0.1 ports $WHEEL_PORT-$((WHEEL_PORT + 20))"
}

make_context() { # <context dir>: what the Dockerfile copies, and nothing else
  mkdir -p "$1/docker"
  cp "$REPO"/docker/{Dockerfile,requirements.txt,train} "$1/docker/"
  tar -C "$REPO" --exclude=__pycache__ --exclude='*.pyc' -c adapter | tar -C "$1" -x
}

cleanup() {
  local pid
  for pid in "$server_pid" "$download_pid"; do
    [[ -n "$pid" ]] && kill "$pid" 2>/dev/null
  done
  rm -rf "$context" "$context.wheels"
}

context=$(mktemp -d "${TMPDIR:-/tmp}/recipes-image.XXXXXX")
server_pid=""
download_pid=""
trap cleanup EXIT
make_context "$context"
build_args=(--build-arg "TORCH_VERSION=$TORCH_VERSION")
if $cpu; then
  tag="${tag:-recipes-train:cpu}"
  if [[ -z "$base" ]]; then
    # The wheels download while debootstrap runs: both mostly wait on the network.
    download_wheels "$SUITE_PYTHON" >"$context.wheels" &
    download_pid=$!
    build_base
    wait "$download_pid" || die "downloading the wheels failed (see above)"
    download_pid=""
    wheels=$(cat "$context.wheels")
    base="$BASE_TAG"
  else
    wheels=$(download_wheels "$(python_version "$base")")
  fi
  serve_wheels "$wheels"
  build_args+=(--build-arg "TORCH_INDEX=cpu" --build-arg "PIP_NO_INDEX=1"
    --build-arg "PIP_FIND_LINKS=$wheel_url" --network host)
else
  tag="${tag:-recipes-train:cu128}"
fi
if [[ -n "$base" ]]; then
  build_args+=(--build-arg "BASE_IMAGE=$base")
fi

log "building $tag (docker build ${build_args[*]} ${docker_args[*]})"
start=$SECONDS
previous=$(docker image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
DOCKER_BUILDKIT=0 docker build -f "$context/docker/Dockerfile" -t "$tag" \
  "${build_args[@]}" "${docker_args[@]}" "$context" >&2
log "built $tag in $((SECONDS - start)) s"
# The image the tag named before, now untagged: only its own top layers (the old source) go.
if [[ -n "$previous" && $(docker image inspect --format '{{len .RepoTags}}' "$previous" \
  2>/dev/null) == 0 ]]; then
  docker rmi "$previous" >/dev/null 2>&1 || true
fi
echo "$tag"
