#!/usr/bin/env bash
# Build the edgefleet .deb from this checkout's committed and untracked (not ignored)
# files, as a clean clone would have them:
#   packaging/build-deb.sh [--out DIR] [--portable] [--arch amd64|arm64]
# The agent goes into its own virtual environment, built for /opt/edgefleet/venv on the
# target's interpreter (Debian's /usr/bin/python3.11; $PYTHON overrides it).
#   --portable  build llama.cpp from source without -march=native and with every CPU
#               variant loaded at run time (GGML_NATIVE=OFF, GGML_BACKEND_DL=ON,
#               GGML_CPU_ALL_VARIANTS=ON): what a release for unknown CPUs must use.
#               About 10 minutes on 2 cores. Without it, pip's cached wheel is used,
#               which llama.cpp compiles for the build machine's CPU.
#   --compression xz|gzip|zstd  xz by default (smallest; about 2.5 minutes on 2 cores);
#               gzip is ten times faster, for CI and tests.
#   --arch      the host's architecture by default. arm64 on an amd64 host cross-builds
#               (docs/operations.md, "arm64"): llama-cpp-python is compiled with Debian's
#               gcc-aarch64-linux-gnu (always portable: every ARMv8 CPU variant but SME),
#               every other package comes from PyPI's manylinux aarch64 wheels.
#               22 CPU-minutes (40 on 2 busy cores); the compiled wheel is kept in
#               $EDGEFLEET_WHEEL_CACHE (default dist/wheel-cache) and reused.
#               packaging/smoke-arm64.sh then runs the package under qemu-user-static.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
out="$repo/dist"
portable=0
compression=xz
arch=$(dpkg --print-architecture)
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --portable) portable=1; shift ;;
    --compression) compression=$2; shift 2 ;;
    --arch) arch=$2; shift 2 ;;
    *) echo "usage: packaging/build-deb.sh [--out DIR] [--portable] [--compression C] [--arch ARCH]" >&2; exit 2 ;;
  esac
done
cross=0
if [ "$arch" != "$(dpkg --print-architecture)" ]; then
  if [ "$arch/$(dpkg --print-architecture)" != arm64/amd64 ]; then
    echo "build-deb: building for $arch on $(dpkg --print-architecture) needs an $arch host or chroot" \
         "(native wheels); only arm64 is cross-built on amd64; see docs/operations.md" >&2
    exit 2
  fi
  for tool in aarch64-linux-gnu-gcc aarch64-linux-gnu-g++ cmake file; do
    command -v "$tool" >/dev/null || {
      echo "build-deb: cross-building for arm64 needs $tool" \
           "(apt install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu cmake file)" >&2
      exit 2
    }
  done
  cross=1
fi
python=${PYTHON:-/usr/bin/python3.11}
prefix=/opt/edgefleet
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 1. a clean source tree: what git would check out, plus new files not yet committed
src="$work/src"
mkdir -p "$src"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard) \
  | (cd "$repo" && xargs -0 -I{} sh -c '[ -e "{}" ] && cp --parents -P "{}" "$0"' "$src")
version=$(cd "$src" && "$python" -c 'import re; print(re.search(r"__version__ = \"(.+)\"", open("agent/__init__.py").read())[1])')

# llama-cpp-python also installs its CMake output at the top of site-packages: libs and
# headers (the package loads its own copies from llama_cpp/lib: 37 MB of dead weight) and, in a
# GGML_BACKEND_DL build (--portable, arm64), the CPU variants libggml-cpu-*.so in bin/, where
# nothing looks for them: they go into llama_cpp/lib, where runtime/gguf/llama_backends.py loads them.
llama_backends_into_package() {
  local site=$1 lib
  if [ -d "$site/bin" ]; then
    for lib in "$site"/bin/libggml-*.so; do
      [ -e "$lib" ] && mv "$lib" "$site/llama_cpp/lib/"
    done
    rmdir "$site/bin" 2>/dev/null || true
  fi
  rm -rf "$site/lib" "$site/include"
}

# 2. the agent's virtual environment, laid out where it will live
root="$work/root"
venv="$root$prefix/venv"
"$python" -m venv --without-pip "$venv"
pip=("$python" -m pip)
"$python" -m pip --version >/dev/null 2>&1 || pip=("${PIP_PYTHON:-$repo/.venv/bin/python}" -m pip)
wheels="$work/wheels"
"${pip[@]}" wheel --quiet --no-deps --wheel-dir "$wheels" "$src"
if [ "$cross" = 1 ]; then
  # shellcheck source=packaging/cross-arm64.sh
  . "$here/cross-arm64.sh"
  cross_arm64_install
else
  extra=()
  if [ "$portable" = 1 ]; then
    export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON"
    extra=(--no-binary llama-cpp-python --no-cache-dir)
  fi
  "${pip[@]}" --python "$venv/bin/python" install --quiet --no-compile --disable-pip-version-check \
    ${extra[@]+"${extra[@]}"} "$wheels"/edgefleet-*.whl
fi

# 3. paths: the venv was built under $root; scripts and metadata must name /opt/edgefleet
grep -rlIF "$root" "$venv" | while read -r f; do sed -i "s|$root||g" "$f"; done
find "$venv" -name direct_url.json -delete
site=$(echo "$venv"/lib/python3.*/site-packages)
[ "$cross" = 1 ] || llama_backends_into_package "$site"
rm -f "$venv"/bin/activate.fish "$venv"/bin/activate.csh "$venv"/bin/Activate.ps1
if grep -rlIF "$root" "$venv" | grep -q .; then
  echo "build-deb: build paths left in the venv" >&2; exit 1
fi
if [ "$cross" = 1 ]; then
  cross_arm64_check_elf "$root"
fi
# byte-compile now, naming the installed paths, so the read-only /opt needs no writes
# (the venv's python is the build host's python3.11 here: .pyc files do not depend on the CPU)
"$venv/bin/python" -m compileall -q -j 0 -s "$root" -p / "$venv/lib" >/dev/null

# 4. the rest of the system's files
install -D -m 0644 "$src/systemd/edgefleet.service" "$root/usr/lib/systemd/system/edgefleet.service"
install -D -m 0644 "$src/systemd/gpu-nvidia.conf" "$root/usr/share/edgefleet/systemd/gpu-nvidia.conf"
install -D -m 0644 "$src/systemd/gpu-rocm.conf" "$root/usr/share/edgefleet/systemd/gpu-rocm.conf"
install -D -m 0644 "$here/sysusers.conf" "$root/usr/lib/sysusers.d/edgefleet.conf"
install -D -m 0644 "$here/tmpfiles.conf" "$root/usr/lib/tmpfiles.d/edgefleet.conf"
install -D -m 0644 "$here/udev.rules" "$root/usr/lib/udev/rules.d/70-edgefleet-rapl.rules"
install -D -m 0644 "$here/agent.toml" "$root/etc/edgefleet/agent.toml"
mkdir -p "$root/usr/bin"
ln -s "$prefix/venv/bin/edgefleet" "$root/usr/bin/edgefleet"
"$here/install-docs.sh" "$src" "$root"   # every page: their links point at each other
install -D -m 0644 /dev/stdin "$root/usr/share/doc/edgefleet/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: edgefleet
License: Apache-2.0
Comment: $prefix/venv bundles third-party Python packages under their own licenses
 (see their .dist-info directories).
COPYRIGHT

# 5. control data
mkdir -p "$root/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
  "$here/debian/control.in" > "$root/DEBIAN/control"
install -m 0644 "$here/debian/conffiles" "$root/DEBIAN/conffiles"
for script in postinst prerm postrm; do
  install -m 0755 "$here/debian/$script" "$root/DEBIAN/$script"
done
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -print0 | sort -z | xargs -0 md5sum | sed 's|\./||') \
  > "$root/DEBIAN/md5sums"

mkdir -p "$out"
deb="$out/edgefleet_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Z"$compression" --build "$root" "$deb" >/dev/null
echo "$deb"
