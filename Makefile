# perfcell build.
#
#   make deps        install the Debian packages (idempotent; needs root)
#   make             build bin/perfcell, bin/perfcell-shard, bin/perfcell-inspect
#                    and the HDF5 Zstandard plugin in lib/hdf5-plugin/
#   make test        build and run every test; ends with "N passed, N failed"
#   make test DEBUG=1  the same with AddressSanitizer and UBSan
#   make fuzz        libFuzzer harnesses (clang) in build/fuzz/
#   make VALGRIND=1  the programs for valgrind, in build/valgrind/bin/
#   make bench       benchmarks (speed and memory against PyTorch / anndata)
#   make demo        set up and run the main job on the bundled pbmc3k data
#
# On a cluster, load your MPI, HDF5 (parallel), OpenBLAS and zstd modules and
# override what pkg-config cannot find, for example:
#   make CC=mpicc HDF5_DIR=$HDF5_ROOT OPENBLAS_DIR=$OPENBLAS_ROOT ZSTD_DIR=$ZSTD_ROOT
# or give the flags directly (HDF5_CFLAGS, HDF5_LIBS, BLAS_CFLAGS, BLAS_LIBS,
# ZSTD_CFLAGS, ZSTD_LIBS, INIPARSER_CFLAGS, INIPARSER_LIBS, RANDOM123_CFLAGS).

ifeq ($(origin CC),default)
CC := mpicc
endif
PKG_CONFIG ?= pkg-config
PYTHON ?= /usr/bin/python3
pc = $(shell $(PKG_CONFIG) $(1) 2>/dev/null)

# --- dependencies -----------------------------------------------------------
ifdef HDF5_DIR
HDF5_CFLAGS ?= -I$(HDF5_DIR)/include
HDF5_LIBS ?= -L$(HDF5_DIR)/lib -Wl,-rpath,$(HDF5_DIR)/lib -lhdf5
else
HDF5_CFLAGS ?= $(or $(call pc,--cflags-only-I hdf5-openmpi),-I/usr/include/hdf5/openmpi)
HDF5_LIBS ?= $(or $(call pc,--libs-only-L hdf5-openmpi),-L/usr/lib/x86_64-linux-gnu/hdf5/openmpi) -lhdf5
endif
ifdef OPENBLAS_DIR
BLAS_CFLAGS ?= -I$(OPENBLAS_DIR)/include
BLAS_LIBS ?= -L$(OPENBLAS_DIR)/lib -Wl,-rpath,$(OPENBLAS_DIR)/lib -lopenblas
else
BLAS_CFLAGS ?= $(or $(call pc,--cflags openblas),-I/usr/include/x86_64-linux-gnu/openblas-pthread)
BLAS_LIBS ?= $(or $(call pc,--libs openblas),-lopenblas)
endif
ifdef ZSTD_DIR
ZSTD_CFLAGS ?= -I$(ZSTD_DIR)/include
ZSTD_LIBS ?= -L$(ZSTD_DIR)/lib -Wl,-rpath,$(ZSTD_DIR)/lib -lzstd
else
ZSTD_CFLAGS ?= $(call pc,--cflags libzstd)
ZSTD_LIBS ?= $(or $(call pc,--libs libzstd),-lzstd)
endif
INIPARSER_CFLAGS ?= $(if $(INIPARSER_DIR),-I$(INIPARSER_DIR)/include,-I/usr/include/iniparser)
INIPARSER_LIBS ?= $(if $(INIPARSER_DIR),-L$(INIPARSER_DIR)/lib) -liniparser
RANDOM123_CFLAGS ?= $(if $(RANDOM123_DIR),-I$(RANDOM123_DIR)/include)

DEP_CFLAGS := $(HDF5_CFLAGS) $(BLAS_CFLAGS) $(ZSTD_CFLAGS) $(INIPARSER_CFLAGS) $(RANDOM123_CFLAGS)
DEP_LIBS := $(HDF5_LIBS) $(BLAS_LIBS) $(ZSTD_LIBS) $(INIPARSER_LIBS) -lz -lpthread -lm

# --- flags ------------------------------------------------------------------
# Compute nodes of another CPU generation: ARCH=x86-64-v3 (or the oldest one).
ARCH ?= native
WARN := -Wall -Wextra -Wshadow -Wno-unused-parameter
ifeq ($(DEBUG),1)
MODE := debug
OPT := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
LDOPT := -fsanitize=address,undefined
BIN := build/debug/bin
else ifeq ($(VALGRIND),1)
# For valgrind (tests/suite_sanitize.sh): no AVX-512, which valgrind cannot
# decode, whatever the build machine; -O0 builds fast and gives exact lines.
MODE := valgrind
OPT := -O0 -g -march=x86-64-v2
LDOPT :=
BIN := build/valgrind/bin
else
MODE := release
OPT := -O3 -g -march=$(ARCH)
LDOPT :=
BIN := bin
endif
CFLAGS ?=
CPPFLAGS += -Iinclude -D_GNU_SOURCE
ALL_CFLAGS = -std=c11 $(WARN) $(OPT) $(CFLAGS) $(CPPFLAGS) $(DEP_CFLAGS) -MMD -MP
BUILD := build/$(MODE)
PLUGIN_DIR := lib/hdf5-plugin

MAIN_SRC := src/cli/perfcell_main.c
LIB_SRC := $(filter-out $(MAIN_SRC),$(sort $(wildcard src/*/*.c)))
LIB_OBJ := $(LIB_SRC:%.c=$(BUILD)/%.o)
LIB := $(BUILD)/libperfcell.a

PROGRAMS := $(BIN)/perfcell $(BIN)/perfcell-shard $(BIN)/perfcell-inspect
TEST_SRC := $(sort $(wildcard tests/test_*.c))
TESTS := $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
BENCH_SRC := $(sort $(wildcard tests/bench/bench_*.c))
BENCHES := $(BENCH_SRC:tests/bench/%.c=$(BUILD)/bench/%)

.PHONY: all deps test bench demo clean tests-build fuzz
all: $(PROGRAMS) $(PLUGIN_DIR)/libh5zstd.so

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -c $< -o $@

$(LIB): $(LIB_OBJ)
	@mkdir -p $(dir $@)
	rm -f $@
	ar rcs $@ $^

$(BIN)/perfcell: $(BUILD)/src/cli/perfcell_main.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDOPT) $< $(LIB) $(DEP_LIBS) -o $@

$(BIN)/perfcell-shard: $(BUILD)/tools/perfcell_shard.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDOPT) $< $(LIB) $(DEP_LIBS) -o $@

$(BIN)/perfcell-inspect: $(BUILD)/tools/perfcell_inspect.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDOPT) $< $(LIB) $(DEP_LIBS) -o $@

# The HDF5 filter plugin (filter id 32015): the same filter code as the
# library, linked only to libzstd, for h5py / anndata / h5dump.
$(BUILD)/pic/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) -std=c11 $(WARN) -O2 -fPIC $(CPPFLAGS) $(DEP_CFLAGS) -c $< -o $@

$(PLUGIN_DIR)/libh5zstd.so: $(BUILD)/pic/src/shards/zstd_filter.o $(BUILD)/pic/tools/h5z_zstd_plugin.o
	@mkdir -p $(dir $@)
	gcc -shared $^ $(ZSTD_LIBS) -o $@

$(BUILD)/tests/%: $(BUILD)/tests/%.o $(LIB)
	$(CC) $(LDOPT) $< $(LIB) $(DEP_LIBS) -o $@

$(BUILD)/bench/%: $(BUILD)/tests/bench/%.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDOPT) $< $(LIB) $(DEP_LIBS) -o $@

tests-build: all $(TESTS) $(BENCHES)

test: deps
	@$(MAKE) --no-print-directory tests-build
	@BIN=$(BIN) TBIN=$(BUILD)/tests MODE=$(MODE) PYTHON=$(PYTHON) bash tests/run.sh

bench: deps
	@$(MAKE) --no-print-directory all $(BENCHES)
	@BIN=$(BIN) BBIN=$(BUILD)/bench PYTHON=$(PYTHON) bash tests/bench/run.sh

demo: deps
	@$(MAKE) --no-print-directory all
	@BIN=$(BIN) PYTHON=$(PYTHON) bash tools/demo.sh

deps:
	@bash tools/install_deps.sh

# --- fuzzing ----------------------------------------------------------------
# `make fuzz` builds the libFuzzer harnesses tests/fuzz/fuzz_*.c into
# build/fuzz/ with clang, AddressSanitizer and UBSan (the library is compiled
# again there with coverage instrumentation). Not part of `make` or `make
# test`'s build: tests/suite_fuzz.sh builds it when clang is present, so a
# machine without clang still builds and tests everything else.
# tests/fuzz/run_smoke.sh NAME SECONDS runs one harness.
FUZZ_CC ?= clang
FUZZ_DIR := build/fuzz
FUZZ_SAN := -fsanitize=address,undefined -fno-sanitize-recover=undefined
FUZZ_CFLAGS = -std=c11 $(WARN) -O1 -g -fno-omit-frame-pointer -fsanitize=fuzzer-no-link $(FUZZ_SAN) \
	$(CPPFLAGS) $(DEP_CFLAGS) $(MPI_CFLAGS) -MMD -MP
# The MPI headers and library (clang is not mpicc).
MPI_CFLAGS ?= $(or $(call pc,--cflags ompi-c),$(shell mpicc --showme:compile 2>/dev/null))
MPI_LIBS ?= $(or $(call pc,--libs ompi-c),$(shell mpicc --showme:link 2>/dev/null),-lmpi)
FUZZ_SRC := $(sort $(wildcard tests/fuzz/fuzz_*.c))
FUZZERS := $(FUZZ_SRC:tests/fuzz/%.c=$(FUZZ_DIR)/%)
FUZZ_LIB := $(FUZZ_DIR)/libperfcell.a
FUZZ_LIB_OBJ := $(LIB_SRC:%.c=$(FUZZ_DIR)/obj/%.o)

fuzz: $(FUZZERS)
.SECONDARY: $(FUZZ_SRC:%.c=$(FUZZ_DIR)/obj/%.o)

$(FUZZ_DIR)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -c $< -o $@

$(FUZZ_LIB): $(FUZZ_LIB_OBJ)
	rm -f $@
	ar rcs $@ $^

# --wrap=_exit: the error sink's exit becomes an abort in the harnesses, so a
# reader that dies instead of returning an error is reported as a crash.
$(FUZZ_DIR)/fuzz_%: $(FUZZ_DIR)/obj/tests/fuzz/fuzz_%.o $(FUZZ_LIB)
	$(FUZZ_CC) -fsanitize=fuzzer $(FUZZ_SAN) -Wl,--wrap=_exit $< $(FUZZ_LIB) $(DEP_LIBS) $(MPI_LIBS) -o $@

clean:
	rm -rf build bin lib

-include $(wildcard $(FUZZ_DIR)/obj/*/*/*.d)
-include $(LIB_OBJ:.o=.d) $(TESTS:=.d) $(wildcard $(BUILD)/tools/*.d $(BUILD)/src/cli/*.d $(BUILD)/tests/bench/*.d)
