# Mambex build. `mix compile` runs this through the in-repo compiler in
# mix.exs (which passes ERTS_INCLUDE_DIR); it also works on its own.
#
#   make                 build priv/mambex_nif.so (+ priv/mambex_cuda.so when nvcc is found)
#   make demo            install what is missing, build, run the demo
#   make test            install what is missing, build, run the tests
#   MAMBEX_NVCC=0 make   skip the CUDA backend; MAMBEX_NVCC=/path/to/nvcc to choose one
#   CUDA_ARCH=sm_90      the GPU architecture to build for

PRIV := priv
OBJ := _build/native
ERTS_INCLUDE_DIR ?= $(shell erl -noshell -eval 'io:format("~ts/erts-~ts/include", [code:root_dir(), erlang:system_info(version)]), halt().' 2>/dev/null)

CC ?= cc
CFLAGS ?= -O3 -march=x86-64-v2
CFLAGS += -std=c11 -D_GNU_SOURCE -fPIC -pthread -Wall -Wextra -Werror=implicit-function-declaration \
          -fvisibility=hidden -I$(ERTS_INCLUDE_DIR)
LDFLAGS += -shared -pthread
LDLIBS += -ldl -lm

# nvcc: MAMBEX_NVCC=0 disables, a path forces one, unset means auto-detect.
ifeq ($(MAMBEX_NVCC),0)
NVCC :=
else ifneq ($(MAMBEX_NVCC),)
NVCC := $(MAMBEX_NVCC)
else
NVCC := $(shell command -v nvcc 2>/dev/null || ( [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda/bin/nvcc ))
endif
CUDA_ARCH ?= sm_90
NVCCFLAGS ?= -O3 -std=c++17 -lineinfo
NVCCFLAGS += -Xcompiler -fPIC,-Wall,-Wextra,-fvisibility=hidden
# The architecture flag of each object. gemm_tf32.cu uses wgmma, which
# exists only in the sm_90a target: built for it (and told so by MX_WGMMA)
# when CUDA_ARCH is sm_90; for any other arch it compiles to a never-chosen stub.
comma := ,
NVARCH = -arch=$(CUDA_ARCH)
$(OBJ)/cuda/gemm_tf32.o: NVARCH = $(if $(filter sm_90,$(CUDA_ARCH)),-gencode=arch=compute_90a$(comma)code=sm_90a -DMX_WGMMA=1,-arch=$(CUDA_ARCH))

NIF_SRC := $(wildcard c_src/nif/*.c c_src/core/*.c c_src/cpu/*.c)
NIF_HDR := $(wildcard c_src/nif/*.h c_src/core/*.h c_src/cpu/*.h)
CUDA_SRC := $(wildcard c_src/cuda/*.cu)
CUDA_OBJ := $(patsubst c_src/cuda/%.cu,$(OBJ)/cuda/%.o,$(CUDA_SRC))
CUDA_HDR := $(wildcard c_src/cuda/*.h c_src/cuda/*.cuh) c_src/core/backend.h c_src/core/numeric.h

TARGETS := $(PRIV)/mambex_nif.so
ifneq ($(NVCC),)
ifneq ($(CUDA_SRC),)
TARGETS += $(PRIV)/mambex_cuda.so
endif
endif

.PHONY: all clean demo test deps
all: $(TARGETS)

# Outputs are built under a temporary name and renamed into place, so a
# loaded object is never overwritten in place.
$(PRIV)/mambex_nif.so: $(NIF_SRC) $(NIF_HDR) Makefile
	@mkdir -p $(PRIV)
	@test -n "$(ERTS_INCLUDE_DIR)" || { echo "ERTS_INCLUDE_DIR not found: install erlang-dev"; exit 1; }
	$(CC) $(CFLAGS) $(NIF_SRC) -o $@.tmp $(LDFLAGS) $(LDLIBS)
	mv -f $@.tmp $@

# One object per CUDA file, so that `make -j` compiles them in parallel.
$(OBJ)/cuda/%.o: c_src/cuda/%.cu $(CUDA_HDR) Makefile
	@mkdir -p $(OBJ)/cuda
	$(NVCC) $(NVCCFLAGS) $(NVARCH) -c $< -o $@

# cuBLASLt (linear.cu) is linked dynamically, found through an rpath to the
# library folder of the toolkit whose nvcc built the object. When it cannot be
# loaded, dlopen of mambex_cuda.so fails and the NIF runs on the CPU only.
CUDA_LIB_DIR := $(if $(NVCC),$(firstword $(wildcard $(realpath $(dir $(realpath $(NVCC)))../lib64) $(realpath $(dir $(realpath $(NVCC)))../lib))))

$(PRIV)/mambex_cuda.so: $(CUDA_OBJ)
	@mkdir -p $(PRIV)
	$(NVCC) -arch=$(CUDA_ARCH) -shared -cudart static $(CUDA_OBJ) -o $@.tmp \
	  $(if $(CUDA_LIB_DIR),-L$(CUDA_LIB_DIR) -Xlinker -rpath -Xlinker $(CUDA_LIB_DIR)) -lcublasLt -lpthread
	mv -f $@.tmp $@

clean:
	rm -f $(PRIV)/*.so $(PRIV)/*.tmp
	rm -rf _build

# Install Erlang/Elixir from Debian packages when missing (needs root or sudo).
deps:
	@if ! command -v mix >/dev/null 2>&1 || [ ! -f /usr/lib/erlang/usr/include/erl_nif.h ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    elixir erlang-dev erlang-eunit erlang-tools make gcc; \
	fi

demo: deps
	mix run bench/demo.exs

test: deps
	mix test
