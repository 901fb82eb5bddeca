defmodule Mambex.FoundationBench do
  # Foundation benchmarks (issue: foundation). Each test prints its figures,
  # appends them to bench/results/foundation.csv and asserts the target only
  # where the issue sets one.
  use ExUnit.Case, async: false

  alias Mambex.{Bench, Ops, Tensor}

  @csv "foundation.csv"

  defp chain_overhead(device) do
    x = Tensor.random_uniform({256}, seed: 1, device: device)

    stats =
      Bench.wall_time(
        device,
        fn -> Enum.reduce(1..1000, x, fn _, acc -> Ops.add(acc, 1.0) end) end,
        warmup: 3,
        runs: 21
      )

    per_op = %{stats | median: stats.median / 1000, p10: stats.p10 / 1000, p90: stats.p90 / 1000, p99: stats.p99 / 1000}
    row = %{op: "chained_add_per_op", shapes: "1000 ops x {256}", dtype: "f32", device: device, stats: per_op}
    BenchHelper.report(@csv, [row])
    per_op.median
  end

  test "per-op overhead on the CPU" do
    assert chain_overhead(:cpu) > 0
  end

  @tag :cuda
  test "per-op overhead on CUDA: 1000 chained adds on 1 KiB tensors, median <= 10 us per op" do
    assert chain_overhead({:cuda, 0}) <= 10.0
  end

  @tag :cuda
  test "device add of 64M floats reaches >= 80% of device copy bandwidth" do
    dev = {:cuda, 0}
    n = 64 * 1024 * 1024
    a = Tensor.random_uniform({n}, seed: 1, device: dev)
    b = Tensor.random_uniform({n}, seed: 2, device: dev)
    bytes = n * 4

    copy = Bench.device_time(dev, fn -> Tensor.slice(a, 0, 0, n) end, runs: 50)
    add = Bench.device_time(dev, fn -> Ops.add(a, b) end, runs: 50)
    copy_bw = 2 * bytes / copy.median / 1.0e3
    add_bw = 3 * bytes / add.median / 1.0e3

    BenchHelper.report(@csv, [
      %{op: "copy_d2d", shapes: "{#{n}}", dtype: "f32", device: dev, stats: copy, metric: "GB/s", value: copy_bw},
      %{op: "add", shapes: "{#{n}}+{#{n}}", dtype: "f32", device: dev, stats: add, metric: "GB/s", value: add_bw},
      %{op: "add_vs_copy", shapes: "{#{n}}", dtype: "f32", device: dev, stats: add, metric: "fraction_of_copy_bw", value: add_bw / copy_bw}
    ])

    assert add_bw >= 0.8 * copy_bw
  end

  @tag :cuda
  test "host to device and back, 256 MB: >= 5 GB/s each way" do
    dev = {:cuda, 0}
    n = 64 * 1024 * 1024
    bin = Tensor.random_uniform({n}, seed: 3) |> Tensor.to_binary()
    t = Tensor.from_binary(bin, {:f, 32}, device: dev)

    h2d = Bench.wall_time(dev, fn -> Tensor.from_binary(bin, {:f, 32}, device: dev) end, warmup: 2, runs: 10)
    d2h = Bench.wall_time(dev, fn -> Tensor.to_binary(t) end, warmup: 2, runs: 10)
    h2d_bw = byte_size(bin) / h2d.median / 1.0e3
    d2h_bw = byte_size(bin) / d2h.median / 1.0e3

    BenchHelper.report(@csv, [
      %{op: "from_binary_h2d", shapes: "{#{n}}", dtype: "f32", device: dev, stats: h2d, metric: "GB/s", value: h2d_bw},
      %{op: "to_binary_d2h", shapes: "{#{n}}", dtype: "f32", device: dev, stats: d2h, metric: "GB/s", value: d2h_bw}
    ])

    assert Tensor.to_binary(t) == bin
    assert h2d_bw >= 5.0
    assert d2h_bw >= 5.0
  end

  test "CPU add of 16M floats within 2x of memcpy" do
    n = 16 * 1024 * 1024
    a = Tensor.random_uniform({n}, seed: 4)
    b = Tensor.random_uniform({n}, seed: 5)
    copy = Bench.wall_time(:cpu, fn -> Tensor.slice(a, 0, 0, n) end, runs: 15)
    add = Bench.wall_time(:cpu, fn -> Ops.add(a, b) end, runs: 15)

    BenchHelper.report(@csv, [
      %{op: "memcpy", shapes: "{#{n}}", dtype: "f32", device: :cpu, stats: copy, metric: "GB/s", value: 2 * n * 4 / copy.median / 1.0e3},
      %{op: "add", shapes: "{#{n}}+{#{n}}", dtype: "f32", device: :cpu, stats: add, metric: "time_vs_memcpy", value: add.median / copy.median}
    ])

    assert add.median <= 2.0 * copy.median
  end
end
