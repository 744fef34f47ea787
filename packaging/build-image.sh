#!/usr/bin/env bash
# Build the edgefleet container image from scratch, with Debian's own tools; no base image
# is pulled from any registry:
#   packaging/build-image.sh [--deb FILE] [--out DIR] [--tag NAME] [--portable]
#   1. the .deb: packaging/build-deb.sh (gzip; --portable passed on), or --deb FILE;
#   2. a Debian bookworm root from debootstrap (--variant=minbase) with bookworm-updates and
#      bookworm-security, and the .deb installed into it by apt, its dependencies from
#      Debian's archive: the image runs what the package installs, nothing else. dpkg keeps
#      no documentation but licence files and edgefleet's own pages
#      (packaging/image/dpkg-nodoc.cfg); no apt lists or caches, no compilers, no pip;
#   3. `buildah from scratch`, that root copied in, the image config set: user edgefleet
#      (uid and gid 10001), volume /var/lib/edgefleet, port 8080, EDGEFLEET_SERVER__HOST=0.0.0.0,
#      HEALTHCHECK on /readyz (packaging/image/healthcheck.py), stop signal SIGTERM;
#      committed in Docker format as --tag (default localhost/edgefleet:VERSION) in root's
#      containers-storage, where podman finds it;
#   4. saved under --out (default dist/) as edgefleet_VERSION_ARCH.oci.tar (an OCI archive)
#      and edgefleet_VERSION_ARCH.docker.tar (a Docker archive: the OCI image config has no
#      HEALTHCHECK field, so only this one carries the health check; `docker load` takes it).
# Prints each step's time, the image's size and what takes the space on stderr, and the OCI
# archive's path last on stdout. About 3 minutes on 2 cores (the .deb about 45 s of it).
# Needs root (debootstrap, chroot, mount), debootstrap, buildah, and the Debian mirror
# ($DEBIAN_MIRROR, $DEBIAN_SECURITY_MIRROR; deb.debian.org by default).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
out="$repo/dist"
deb=""
tag=""
portable=()
suite=bookworm
uid=10001
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
arch=$(dpkg --print-architecture)
usage="usage: packaging/build-image.sh [--deb FILE] [--out DIR] [--tag NAME] [--portable]"
while [ $# -gt 0 ]; do
  case "$1" in
    --deb) deb=$(realpath "$2"); shift 2 ;;
    --out) out=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --portable) portable=(--portable); shift ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
die() { echo "build-image: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mount)"
for tool in debootstrap buildah; do
  command -v "$tool" >/dev/null || die "needs $tool (apt install debootstrap buildah)"
done
if [ -n "$deb" ]; then
  [ -f "$deb" ] || die "no such .deb: $deb"
  deb_arch=$(dpkg-deb -f "$deb" Architecture)
  [ "$deb_arch" = "$arch" ] || die "$deb is for $deb_arch; this host builds $arch images"
fi
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$repo/agent/__init__.py")
tag=${tag:-localhost/edgefleet:$version}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/var/tmp}/edgefleet-image.XXXXXX")
root="$work/root"
ctr=""
cleanup() {
  mountpoint -q "$root/proc" 2>/dev/null && umount "$root/proc"
  [ -n "$ctr" ] && buildah rm "$ctr" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT
started=$SECONDS
step() { echo "build-image: $* (at $((SECONDS - started))s)" >&2; }

# 1. the package
if [ -z "$deb" ]; then
  step "building the .deb"
  deb=$("$here/build-deb.sh" --out "$work/deb" --compression gzip ${portable[@]+"${portable[@]}"} | tail -n 1)
fi

# 2. the root: Debian's minimal base, then the package through apt
step "debootstrap --variant=minbase $suite ($mirror)"
if ! debootstrap --variant=minbase --arch="$arch" "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1; then
  tail -n 20 "$work/debootstrap.log" >&2
  die "debootstrap failed (log above)"
fi
cat >"$root/etc/apt/sources.list" <<SOURCES
deb $mirror $suite main
deb $mirror $suite-updates main
deb $security $suite-security main
SOURCES
install -m 0644 "$here/image/dpkg-nodoc.cfg" "$root/etc/dpkg/dpkg.cfg.d/edgefleet-image-nodoc"
# what debootstrap installed before that rule: the same paths go
find "$root/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/lintian "$root"/usr/share/linda
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
# A fixed uid and gid, so that a bind-mounted state dir can be chowned to it before the
# first start (docs/operations.md); the package's sysusers.d line then finds the user there.
chroot "$root" groupadd --system --gid "$uid" edgefleet
chroot "$root" useradd --system --uid "$uid" --gid "$uid" --home-dir /var/lib/edgefleet --no-create-home \
  --shell /usr/sbin/nologin --comment "edgefleet agent" edgefleet
in_root() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 "$@"; }
mount -t proc proc "$root/proc"
cp "$deb" "$root/tmp/"
step "apt: security updates, then $(basename "$deb") and its dependencies"
in_root apt-get -q update >"$work/apt.log" 2>&1 || { tail -n 20 "$work/apt.log" >&2; die "apt-get update failed"; }
in_root apt-get -q -y upgrade >>"$work/apt.log" 2>&1 || { tail -n 20 "$work/apt.log" >&2; die "apt-get upgrade failed"; }
if ! in_root apt-get -q -y install --no-install-recommends "/tmp/$(basename "$deb")" >>"$work/apt.log" 2>&1; then
  tail -n 30 "$work/apt.log" >&2
  die "installing the package failed (log above)"
fi
in_root apt-get clean
umount "$root/proc"
install -D -m 0644 "$here/image/healthcheck.py" "$root/usr/local/lib/edgefleet/healthcheck.py"

# what an image must not carry: caches, logs, this machine's identity, device nodes
rm -rf "${root:?}"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/debconf/*-old \
  "$root"/var/lib/dpkg/*-old "$root"/tmp/* "$root"/var/tmp/* "$root"/root/.cache "${root:?}"/dev/*
find "$root/var/log" -type f -delete
rm -f "$root/etc/resolv.conf" "$root/etc/hostname" "$root/etc/machine-id" "$root/var/lib/dbus/machine-id"
for tool in gcc cc c++ g++ make pip pip3; do
  if [ -e "$root/usr/bin/$tool" ] || [ -e "$root/opt/edgefleet/venv/bin/$tool" ]; then
    die "$tool is in the image root; it must carry no build tools"
  fi
done
if find "$root/usr/lib" "$root/opt/edgefleet/venv/lib" -maxdepth 4 -type d -name pip 2>/dev/null | grep -q .; then
  die "pip is in the image root"
fi

# 3. the image (Docker format while it is built: the OCI config has no HEALTHCHECK field)
step "buildah from scratch, the root copied in, the config set"
export BUILDAH_FORMAT=docker
ctr=$(buildah from --arch "$arch" scratch)
mnt=$(buildah mount "$ctr")
cp -a "$root/." "$mnt/"
buildah umount "$ctr" >/dev/null
created=$(date -u +%Y-%m-%dT%H:%M:%SZ)
buildah config \
  --os linux --arch "$arch" \
  --user "$uid:$uid" --workingdir /var/lib/edgefleet \
  --volume /var/lib/edgefleet --port 8080/tcp \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env LANG=C.UTF-8 \
  --env EDGEFLEET_SERVER__HOST=0.0.0.0 \
  --entrypoint '["/usr/bin/edgefleet"]' --cmd '["serve"]' \
  --stop-signal SIGTERM \
  --healthcheck "CMD /opt/edgefleet/venv/bin/python /usr/local/lib/edgefleet/healthcheck.py" \
  --healthcheck-interval 30s --healthcheck-timeout 10s --healthcheck-retries 3 \
  --healthcheck-start-period 10m \
  --label org.opencontainers.image.title=edgefleet \
  --label "org.opencontainers.image.description=edgefleet agent: local GGUF and ONNX models over the OpenAI and KServe v2 APIs" \
  --label "org.opencontainers.image.version=$version" \
  --label org.opencontainers.image.licenses=Apache-2.0 \
  --label org.opencontainers.image.source=https://github.com/edgefleet/edgefleet \
  --label "org.opencontainers.image.base.name=debian:$suite (debootstrap --variant=minbase, not pulled)" \
  --label "org.opencontainers.image.created=$created" \
  "$ctr"
buildah commit --quiet --format docker "$ctr" "$tag" >/dev/null
buildah rm "$ctr" >/dev/null
ctr=""

# 4. the archives
step "saving the archives"
oci="$out/edgefleet_${version}_${arch}.oci.tar"
docker="$out/edgefleet_${version}_${arch}.docker.tar"
rm -f "$oci" "$docker"
buildah push --quiet "$tag" "oci-archive:$oci:${tag#localhost/}"
buildah push --quiet "$tag" "docker-archive:$docker:$tag"

# what takes the space
{
  echo "build-image: done in $((SECONDS - started))s: $tag"
  echo "  image (unpacked): $(du -sm "$root" | cut -f1) MB; $(basename "$oci"): $(du -m "$oci" | cut -f1) MB;" \
       "$(basename "$docker"): $(du -m "$docker" | cut -f1) MB"
  echo "  largest parts (MB):"
  site=$(echo "$root"/opt/edgefleet/venv/lib/python3.*/site-packages)
  {
    du -sm "$site"/* "$root"/usr/lib/python3.* "$root"/usr/lib/*-linux-gnu* "$root"/usr/bin "$root"/usr/sbin "$root"/usr/share "$root"/var/lib "$root"/etc "$root"/usr/lib/systemd 2>/dev/null
  } | sort -rn | head -n 14 | sed "s|$root||; s|^|    |"
} >&2
echo "$oci"
