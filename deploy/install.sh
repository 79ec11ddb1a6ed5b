#!/usr/bin/env bash
# Install Keel on a Debian 12 node: packages, a release under
# /opt/keel/releases/<version>/ (a self-contained virtualenv), the
# `current` pointer, the shim on containerd's PATH, containerd itself
# (configured with the keel runtime) and, with --demo, run a demo pod.
#
#   deploy/install.sh [--demo] [--releases DIR] [--no-containerd]
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
releases=/opt/keel/releases
demo=0
containerd=1
while [ $# -gt 0 ]; do
    case $1 in
        --demo) demo=1 ;;
        --releases) releases=$2; shift ;;
        --no-containerd) containerd=0 ;;
        -h|--help) sed -n 2,8p "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root" >&2; exit 1; }

step() { printf '==> %s\n' "$*"; }

step "installing Debian packages"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq containerd runc busybox-static libsystemd-dev pkg-config gcc \
    iproute2 util-linux >/dev/null
# A Debian python3 needs these for the release venv (systemd-python compiles).
python3 -c 'import ensurepip, venv' 2>/dev/null || apt-get install -y -qq python3-venv >/dev/null
python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' \
    || apt-get install -y -qq python3-dev >/dev/null

version=$(python3 -c 'import tomllib,sys; print(tomllib.load(open(sys.argv[1],"rb"))["project"]["version"])' "$here/pyproject.toml")
dest=$releases/$version
step "installing Keel $version into $dest"
python3 -m venv "$dest"
"$dest/bin/pip" install -q --upgrade pip
"$dest/bin/pip" install -q "$here"
# What a VM receives to run this release's agent (VM agent upgrades).
"$dest/bin/python" -I -m shim.vmm.qemu.guest_release build "$dest/guest" >/dev/null
ln -sfn "$dest" "$releases/current.tmp" && mv -T "$releases/current.tmp" "$releases/current"
ln -sf "$releases/current/bin/containerd-shim-keel-v2" /usr/local/bin/containerd-shim-keel-v2
for cmd in opsd opsctl keel-agent; do
    [ -e "$releases/current/bin/$cmd" ] && ln -sf "$releases/current/bin/$cmd" "/usr/local/bin/$cmd"
done

if [ $containerd = 1 ]; then
    step "configuring containerd (runtime io.containerd.keel.v2)"
    mkdir -p /etc/containerd
    if [ ! -s /etc/containerd/config.toml ]; then
        containerd config default > /etc/containerd/config.toml
    fi
    # Declaring any runtime under CRI replaces its implicit runc entry, and CRI
    # then fails to load ("no corresponding runtime configured ... runc"):
    # declare runc explicitly when the file does not.
    if ! grep -q 'runtimes.runc\]' /etc/containerd/config.toml; then
        cat >> /etc/containerd/config.toml <<'TOML'

# Added by Keel's install.sh: the default runc handler, kept explicit.
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
TOML
    fi
    if ! grep -q 'runtimes.keel\]' /etc/containerd/config.toml; then
        cat >> /etc/containerd/config.toml <<'TOML'

# Added by Keel's install.sh: the keel RuntimeClass handler for CRI.
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.keel]
  runtime_type = "io.containerd.keel.v2"
TOML
    fi
    if ! ctr version >/dev/null 2>&1; then
        if [ -d /run/systemd/system ]; then
            systemctl enable --now containerd
        else
            step "starting containerd (no systemd here; log in /var/log/containerd.log)"
            nohup containerd >>/var/log/containerd.log 2>&1 &
        fi
        for _ in $(seq 100); do ctr version >/dev/null 2>&1 && break; sleep 0.1; done
        ctr version >/dev/null || { echo "containerd did not start; see its log" >&2; exit 1; }
    fi
fi

if [ -d /run/systemd/system ]; then
    step "installing the opsd unit (keel-opsd.service)"
    install -m 0644 "$here/deploy/systemd/keel-opsd.service" /etc/systemd/system/
    systemctl daemon-reload
    systemctl enable --now keel-opsd.service
else
    step "no systemd here: start opsd by hand if you need live upgrades (see deploy/systemd/keel-opsd.service)"
fi

if [ $demo = 1 ]; then
    step "building a busybox image from Debian's busybox-static"
    tar=$(cd "$here" && "$dest/bin/python" -m tests.images.busybox /var/lib/keel/images)
    ref=localhost/keel/busybox:test
    ctr images import "$tar" >/dev/null
    ctr images ls -q | grep -qx "$ref" || { echo "image import did not produce $ref" >&2; exit 1; }
    step "running a demo pod under Keel"
    ctr run --rm --runtime io.containerd.keel.v2 "$ref" "keel-demo-$$" \
        sh -c 'echo "hello from a keel sandbox: hostname $(hostname), pid $$"'
fi
step "done: containerd runs pods with --runtime io.containerd.keel.v2"
