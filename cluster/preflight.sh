#!/usr/bin/env bash
# Pre-flight checks that fail early and loudly, before Ray starts, instead of a cluster that
# comes up without GPUs (or not at all) and says so only in the autoscaler's log.
#
#   bash cluster/preflight.sh config cluster/aws-gpu.yaml   # on your machine, before `ray up`:
#                                                           # no placeholder left in the file
#   bash preflight.sh host [--gpu] [--image IMAGE]          # on a node's host, before the
#                                                           # container starts (aws-gpu.yaml's
#                                                           # initialization_commands): Docker,
#                                                           # registry login, NVIDIA driver
#   bash cluster/preflight.sh gpu                           # inside a GPU container (KubeRay's
#                                                           # init container): driver, GPU
#
# Why driver >= 580: the image's torch 2.14 is PyPI's CUDA 13.0 build, which needs an NVIDIA
# driver >= 580 and GPUs of compute capability >= 7.5 (T4, A10G, L4, A100, H100; not V100).
# MIN_DRIVER overrides the minimum (e.g. for a cu12x torch build).
set -uo pipefail

MIN_DRIVER=${MIN_DRIVER:-580}
MIN_COMPUTE_CAP=${MIN_COMPUTE_CAP:-7.5}
# Values the shipped files carry until a user sets theirs.
PLACEHOLDERS='ami-SET-ME|registry\.example\.com|<ACCOUNT_ID>|123456789012'

fail() { echo "preflight: FAIL: $*" >&2; exit 1; }
ok() { echo "preflight: ok: $*"; }

check_config() {  # a cluster config or manifest, on the user's machine
    local file=$1
    [ -f "$file" ] || fail "$file: no such file"
    local left
    left=$(grep -nE "$PLACEHOLDERS" "$file" | grep -vE '^\s*[0-9]+:\s*#')
    if [ -n "$left" ]; then
        echo "$left" >&2
        fail "$file still has placeholders (AMI id, image registry or account id): set them" \
             "first (cluster/README.md, 'AMIs' and 'Build and push the image')"
    fi
    grep -qE '^\s*ImageId:\s*latest_dlami' "$file" && \
        fail "$file: latest_dlami is an Ubuntu 18.04 AMI with a driver far older than $MIN_DRIVER"
    ok "$file has no placeholders"
}

check_gpu() {  # nvidia-smi answers, driver and compute capability new enough
    command -v nvidia-smi >/dev/null 2>&1 || \
        fail "nvidia-smi not found: no NVIDIA driver on this GPU node (use a GPU AMI / image" \
             "with driver >= $MIN_DRIVER)"
    local drivers caps
    drivers=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null) || \
        fail "nvidia-smi failed: the driver is not loaded"
    [ -n "$drivers" ] || fail "nvidia-smi lists no GPU"
    local major=${drivers%%.*}
    major=${major//[^0-9]/}
    [ -n "$major" ] && [ "$major" -ge "$MIN_DRIVER" ] || \
        fail "NVIDIA driver ${drivers%%$'\n'*} is older than $MIN_DRIVER, which torch's CUDA 13.0" \
             "build needs: pick an AMI / node image with a newer driver"
    caps=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null || true)
    for cap in $caps; do
        awk -v c="$cap" -v m="$MIN_COMPUTE_CAP" 'BEGIN { exit !(c + 0 >= m + 0) }' || \
            fail "GPU of compute capability $cap: CUDA 13.0 torch needs >= $MIN_COMPUTE_CAP"
    done
    ok "$(echo "$drivers" | wc -l) GPU(s), driver ${drivers%%$'\n'*} (>= $MIN_DRIVER)${caps:+, compute capability $(echo $caps)}"
}

registry_login() {  # ECR needs a docker login on every host (tokens last 12 hours)
    local image=$1 registry=${1%%/*}
    if [[ "$registry" =~ ^([0-9]+)\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com$ ]]; then
        local region=${BASH_REMATCH[2]}
        command -v aws >/dev/null 2>&1 || fail "aws CLI not found: cannot log in to $registry"
        aws ecr get-login-password --region "$region" | \
            docker login --username AWS --password-stdin "$registry" >/dev/null || \
            fail "docker login to $registry failed: the node's IAM role needs ECR read rights" \
                 "(cluster/iam/ecr-read-policy.json)"
        ok "logged in to $registry"
    else
        ok "$registry is not ECR: no login (a private registry needs its own docker login here)"
    fi
}

mode=${1:-}
shift || true
case "$mode" in
    config)
        [ $# -ge 1 ] || fail "usage: preflight.sh config FILE..."
        for f in "$@"; do check_config "$f"; done
        ;;
    host)
        gpu=0; image=""
        while [ $# -gt 0 ]; do
            case "$1" in
                --gpu) gpu=1 ;;
                --image) image=${2:-}; shift ;;
                *) fail "unknown option $1" ;;
            esac
            shift
        done
        command -v docker >/dev/null 2>&1 || fail "docker not found on this host: use an AMI with Docker"
        if [ -n "$image" ]; then
            echo "$image" | grep -qE "$PLACEHOLDERS" && \
                fail "docker image $image is a placeholder: build and push cluster/Dockerfile, then set it"
            registry_login "$image"
        fi
        [ "$gpu" = 1 ] && check_gpu
        ok "host ready"
        ;;
    gpu)
        check_gpu
        ;;
    *)
        fail "usage: preflight.sh config FILE... | host [--gpu] [--image IMAGE] | gpu"
        ;;
esac
