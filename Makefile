# Thin wrappers around CMake. `make test` is the README's test command.
BUILD ?= build
JOBS  ?= $(shell nproc)
CMAKE_FLAGS ?=

.PHONY: all deps configure build test bench run clean

all: build

deps:
	@./scripts/install-deps.sh

$(BUILD)/build.ninja:
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS)

configure: deps $(BUILD)/build.ninja

build: configure
	cmake --build $(BUILD) -j $(JOBS)

test: build
	cd $(BUILD) && ctest -L cpu --output-on-failure -j $(JOBS)

bench: build
	$(BUILD)/bench/bench_mixer
	$(BUILD)/tools/mamba3/mamba3 bench

# Generation on CPU. Until the embedded default model lands, MODEL defaults to a small golden test model
# (random weights: the text is noise, the path through the engine is the real one).
MODEL ?= ../shared/golden/lm_hybrid
PROMPT ?= Mamba-3 is
run: build
	$(BUILD)/tools/mamba3/mamba3 generate -m $(MODEL) -p "$(PROMPT)" -n 32 --seed 1

clean:
	rm -rf $(BUILD)
