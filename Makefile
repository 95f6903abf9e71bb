# Thin wrappers around CMake. `make demo` is the README's first command, `make test` its test command.
BUILD ?= build
JOBS  ?= $(shell nproc)
CMAKE_FLAGS ?=

.PHONY: all deps configure build cli test bench demo run clean

all: build

deps:
	@./scripts/install-deps.sh

$(BUILD)/build.ninja:
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS)

configure: deps $(BUILD)/build.ninja

build: configure
	cmake --build $(BUILD) -j $(JOBS)

# Only the command-line tool (what `make demo` needs; `build` also compiles every test and benchmark).
cli: configure
	cmake --build $(BUILD) -j $(JOBS) --target mamba3_cli

test: build
	cd $(BUILD) && ctest -L cpu --output-on-failure -j $(JOBS)

bench: build
	$(BUILD)/bench/bench_mixer
	$(BUILD)/tools/mamba3/mamba3 bench

# Generation on CPU with the embedded default model (models/default, found by `mamba3 generate` without -m);
# MODEL=DIR picks another model directory. tests/cli/test_demo.sh runs the same command.
DEMO_PROMPT ?= The jury said
DEMO_TOKENS ?= 300
MODEL ?=
demo: cli
	$(BUILD)/tools/mamba3/mamba3 generate $(if $(MODEL),-m $(MODEL)) -p "$(DEMO_PROMPT)" -n $(DEMO_TOKENS) --seed 1

run: demo

clean:
	rm -rf $(BUILD)
