# Sourced by the device scripts (gpu-check.sh, prefill-ablate.sh): the device image has CMake,
# the CUDA toolkit and PyTorch but no cJSON (nor, on some images, zlib's headers). With the
# Debian packages carried in .deb/ (apt-get download libcjson-dev libcjson1 zlib1g-dev), unpacks
# them into a private prefix and sets `extra` (CMake arguments) and LD_LIBRARY_PATH; without
# .deb/, leaves `extra` empty (the system's packages are used).
# Also defines gpu_build, the one configure + build recipe of the device scripts.
DEPS=/tmp/fp4moe-deps
extra=()
if ls .deb/*.deb > /dev/null 2>&1; then
  mkdir -p "$DEPS"
  for f in .deb/*.deb; do dpkg -x "$f" "$DEPS"; done
  lib=$(dirname "$(find "$DEPS" -name 'libcjson.so*' | head -1)")
  extra+=(-DCJSON_INCLUDE_DIR="$DEPS/usr/include" -DCJSON_LIBRARY="$lib/libcjson.so")
  if [ ! -f /usr/include/zlib.h ] && [ -f "$DEPS/usr/include/zlib.h" ]; then
    zlib=$(ls /usr/lib/x86_64-linux-gnu/libz.so.1 /lib/x86_64-linux-gnu/libz.so.1 2>/dev/null | head -1)
    extra+=(-DZLIB_INCLUDE_DIR="$DEPS/usr/include" -DZLIB_LIBRARY="$zlib")
  fi
  export LD_LIBRARY_PATH="$lib:${LD_LIBRARY_PATH:-}"
fi

# gpu_build SRC BUILD LOG JOBS CUDA_FLAGS TARGET...: configures and builds the tree SRC for sm_90a
# into BUILD with the packages above, output to LOG. (Warnings that other files may raise mid-edit
# must not stop a device run: not -Werror on maybe-uninitialized, which depends on the host
# compiler's version.)
gpu_build() {
  local src=$1 build=$2 log=$3 jobs=$4 flags=$5
  shift 5
  cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a "${extra[@]}" \
    -DCMAKE_C_FLAGS=-Wno-error=maybe-uninitialized -DCMAKE_CUDA_FLAGS="$flags" > "$log" 2>&1 \
    && cmake --build "$build" -j"$jobs" --target "$@" >> "$log" 2>&1
}
