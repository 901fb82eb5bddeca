#!/bin/sh
# Builds the CUDA backend, a copy of it whose step and cluster kernels record phase
# edges (-DMX_INFER_TRACE), and bench/cuda/infer_harness.c; runs the harness
# on both for 2 and 4 layers at batch 1 and 8. Output under $OUT.
#   sh bench/gpu/infer_probe.sh
set -eu
make -j16 priv/mambex_cuda.so > "$OUT/probe_build.log" 2>&1 || { tail -30 "$OUT/probe_build.log"; exit 1; }
T=/tmp/mambex_trace
mkdir -p $T
for k in infer_step infer_cluster; do
  nvcc -O3 -std=c++17 -arch=sm_90 -lineinfo -Xcompiler -fPIC,-fvisibility=hidden -DMX_INFER_TRACE \
    -c c_src/cuda/$k.cu -o $T/$k.o
done
objs=$(ls _build/native/cuda/*.o | grep -v '/infer_step.o$' | grep -v '/infer_cluster.o$')
nvcc -arch=sm_90 -shared -cudart static $objs $T/infer_step.o $T/infer_cluster.o -o $T/mambex_cuda.so -lcublasLt -lpthread
cc -O2 -std=gnu11 -o $T/infer_harness bench/cuda/infer_harness.c -ldl -lm
for l in 2 4; do
  for b in 1 8; do
    $T/infer_harness priv/mambex_cuda.so $l $b 300
  done
done | tee "$OUT/infer_probe.txt"
$T/infer_harness $T/mambex_cuda.so 2 1 50 | tee "$OUT/infer_trace.txt"
