# Sourced by packaging/build-deb.sh for `--arch arm64` on an amd64 host: fills the venv
# at $venv with arm64 code without running any of it.
#   - llama-cpp-python has no arm64 wheel on PyPI: its sdist is compiled with Debian's
#     aarch64 cross compiler (packaging/aarch64-linux-gnu.cmake), portable (every ARMv8 CPU
#     variant, picked at run time), and the wheel is cached in $EDGEFLEET_WHEEL_CACHE.
#   - everything else is PyPI's manylinux aarch64 wheels, installed with pip's --platform
#     options (pip cannot target another platform inside a venv, hence --target).
# Uses: $here $repo $work $wheels $venv $prefix and the pip command in "${pip[@]}".

# Wheels for Debian bookworm's glibc 2.36 or any older one (pip expands only the legacy
# manylinux2014 name by itself, so the PEP 600 names are listed).
cross_arm64_platforms() {
  local minor
  echo --platform linux_aarch64 --platform manylinux2014_aarch64
  for minor in $(seq 17 36); do echo --platform "manylinux_2_${minor}_aarch64"; done
}

cross_arm64_llama_wheel() {
  local cache=$1 spec sdist src flags
  if ls "$cache"/llama_cpp_python-*-linux_aarch64.whl >/dev/null 2>&1; then
    return 0
  fi
  spec=$(grep -o '"llama-cpp-python[^"]*"' "$repo/pyproject.toml" | tr -d '"')
  echo "build-deb: cross-compiling $spec for arm64 (22 CPU-minutes: 40 minutes on 2 busy cores)" >&2
  # --no-binary names the one package: with :all: pip would also build the build backend's own
  # requirements from sdists, recursively (found by the first run of this script from scratch)
  "${pip[@]}" download --quiet --disable-pip-version-check --no-deps --no-binary llama-cpp-python \
    --dest "$work/sdist" "$spec"
  sdist=$(echo "$work"/sdist/llama_cpp_python-*.tar.gz)
  mkdir -p "$work/llama-src"
  tar -xzf "$sdist" -C "$work/llama-src"
  src=$(echo "$work"/llama-src/llama_cpp_python-*)
  # The two SME variants need -march=armv9.2-a+sme, which bookworm's GCC 12 does not know;
  # without them an SME CPU (rare on Linux today) takes the armv8.6 SVE2 variant.
  if ! echo 'int x;' | aarch64-linux-gnu-gcc -march=armv9.2-a+sme -x c -c - -o /dev/null 2>/dev/null; then
    sed -i '/ggml_add_cpu_backend_variant(armv9.2_/d' "$src/vendor/llama.cpp/ggml/src/CMakeLists.txt"
  fi
  flags="-DCMAKE_TOOLCHAIN_FILE=$here/aarch64-linux-gnu.cmake -DGGML_NATIVE=OFF"
  flags="$flags -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON"
  # scikit-build-core names the wheel's platform after _PYTHON_HOST_PLATFORM
  mkdir -p "$cache"
  _PYTHON_HOST_PLATFORM=linux_aarch64 CMAKE_ARGS="$flags" \
    "${pip[@]}" wheel --quiet --disable-pip-version-check --no-deps --no-cache-dir \
    --wheel-dir "$cache" "$src"
  ls "$cache"/llama_cpp_python-*-linux_aarch64.whl >/dev/null
}

cross_arm64_install() {
  local cache=${EDGEFLEET_WHEEL_CACHE:-$repo/dist/wheel-cache}
  local site dl target=() rest=() wheel script
  cross_arm64_llama_wheel "$cache"
  site=$(echo "$venv"/lib/python3.*/site-packages)
  target=(--quiet --no-compile --disable-pip-version-check --target "$site" $(cross_arm64_platforms)
          --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none --only-binary=:all:)
  # resolve once for arm64 (environment markers are evaluated for this host: only hf-xet has a
  # platform_machine marker today, and it names both x86_64 and aarch64)
  dl="$work/arm64-wheels"
  "${pip[@]}" download --quiet --disable-pip-version-check --dest "$dl" $(cross_arm64_platforms) \
    --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none --only-binary=:all: \
    --find-links "$cache" "$wheels"/edgefleet-*.whl
  # llama-cpp-python alone first: its wheel carries CMake's install tree (bin/, lib/, include/)
  # at the top of site-packages, and pip --target would then skip the console scripts' bin/
  "${pip[@]}" install "${target[@]}" --no-deps "$dl"/llama_cpp_python-*.whl
  llama_backends_into_package "$site"
  for wheel in "$dl"/*.whl; do
    case "$(basename "$wheel")" in llama_cpp_python-*) ;; *) rest+=("$wheel") ;; esac
  done
  ls "$dl"/edgefleet-*.whl >/dev/null 2>&1 || rest+=("$wheels"/edgefleet-*.whl)
  "${pip[@]}" install "${target[@]}" --no-deps --no-index "${rest[@]}"
  # --target puts console scripts in site-packages/bin, their #! naming the build's python
  for script in "$site"/bin/*; do
    if head -c 2 "$script" | grep -q '#!'; then
      sed -i "1s|^#!.*python.*\$|#!$prefix/venv/bin/python|" "$script"
    fi
    mv "$script" "$venv/bin/"
  done
  rmdir "$site/bin"
}

# Every ELF file in the package must be arm64 code.
cross_arm64_check_elf() {
  local bad
  bad=$(find "$1" -type f -print0 | xargs -0 file -N -F '|' | grep '| *ELF' | grep -v 'ARM aarch64' || true)
  if [ -n "$bad" ]; then
    echo "build-deb: non-arm64 ELF files in the arm64 package:" >&2
    echo "$bad" | head -20 >&2
    exit 1
  fi
}
