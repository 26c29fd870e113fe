# Thin wrapper over CMake: `make demo` builds and runs the demo, `make test` builds and runs the
# tests. BUILD picks the build folder; CMAKE_FLAGS passes options (e.g. -DFP4MOE_CUDA=OFF).
BUILD ?= build
CMAKE_FLAGS ?=
JOBS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: all configure demo test bench sanitize fuzz clean

all: configure
	cmake --build $(BUILD) -j$(JOBS)

configure:
	@test -f $(BUILD)/CMakeCache.txt || cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS)

demo: all
	./$(BUILD)/fp4moe demo

test: all
	cd $(BUILD) && ctest --output-on-failure -j$(JOBS)

bench: all
	./$(BUILD)/fp4moe bench --preset qwen3-30b-a3b --tokens 1,16,256

# The test suite under AddressSanitizer + UndefinedBehaviorSanitizer (+ LeakSanitizer), CPU only.
sanitize:
	@test -f build-asan/CMakeCache.txt || cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo \
		-DFP4MOE_SANITIZE=ON -DFP4MOE_CUDA=OFF
	cmake --build build-asan -j$(JOBS)
	cd build-asan && ctest --output-on-failure -j$(JOBS) -LE large

# Short libFuzzer runs of every parser of untrusted bytes (clang); FUZZ_SECONDS per target.
fuzz:
	bash scripts/fuzz-short.sh

clean:
	rm -rf $(BUILD) build-asan build-fuzz
