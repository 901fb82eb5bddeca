defmodule Mambex.ScanBench do
  # Selective scan benchmarks (issue: selective scan). D = 512, N = 16, G = 1,
  # with z, D, delta_bias and softplus, as in DESIGN.md §7. Each test prints its
  # figures and appends them to bench/results/scan.csv. GFLOP/s counts 6 flops
  # per (b, t, d, n) element of the forward ("useful work"), also for
  # forward+backward, so the two figures compare directly. Only the CPU forward
  # target is asserted; the GPU figures are reported.
  use ExUnit.Case, async: false

  alias Mambex.{Bench, Ops, Scan, Tensor}

  @csv "scan.csv"
  @dim 512
  @dstate 16

  # Input sets are rotated when one set is small enough to stay in a cache
  # between runs (CPU L2 / GPU L2 of ~60 MB), so no run reads warm inputs.
  defp input_sets(batch, len, io, param, device) do
    bytes = batch * len * @dim * 4 * 6
    count = if bytes < 256 * 1024 * 1024, do: 4, else: 1
    for k <- 1..count, do: inputs(batch, len, io, param, device, 1000 * k)
  end

  defp inputs(batch, len, io, param, device, seed) do
    uni = fn shape, type, s, lo, hi ->
      Tensor.random_uniform(shape, seed: seed + s, min: lo, max: hi, type: type, device: device)
    end

    bld = {batch, len, @dim}
    bln = {batch, len, @dstate}

    %{
      u: uni.(bld, io, 1, -1.0, 1.0),
      delta: uni.(bld, io, 2, -1.0, 1.0),
      z: uni.(bld, io, 3, -2.0, 2.0),
      b: uni.(bln, io, 4, -1.0, 1.0),
      c: uni.(bln, io, 5, -1.0, 1.0),
      d_out: uni.(bld, io, 6, -1.0, 1.0),
      # A = -exp(U(-1, 1.5)): decay rates of realistic Mamba layers
      a: Ops.negate(Ops.exp(uni.({@dim, @dstate}, param, 7, -1.0, 1.5))),
      d: uni.({@dim}, param, 8, 0.5, 1.5),
      delta_bias: uni.({@dim}, param, 9, -4.0, -1.0)
    }
  end

  defp rotating(sets) do
    n = length(sets)
    sets = List.to_tuple(sets)
    counter = :counters.new(1, [])

    fn ->
      :counters.add(counter, 1, 1)
      elem(sets, rem(:counters.get(counter, 1), n))
    end
  end

  defp forward(x) do
    Scan.forward(x.u, x.delta, x.a, x.b, x.c,
      d: x.d,
      z: x.z,
      delta_bias: x.delta_bias,
      softplus: true
    )
  end

  defp fwd_fun(next),
    do: fn ->
      {out, fin, _ctx} = forward(next.())
      [out, fin]
    end

  defp fwd_bwd_fun(next) do
    fn ->
      x = next.()
      {out, fin, ctx} = forward(x)
      grads = Scan.backward(ctx, x.d_out)
      [out, fin | Map.values(grads)]
    end
  end

  defp gflops(batch, len, stats), do: 6.0 * batch * len * @dim * @dstate / stats.median / 1.0e3

  defp row(op, batch, len, dtype, device, stats) do
    %{
      op: op,
      shapes: "B=#{batch} L=#{len} D=#{@dim} N=#{@dstate} G=1",
      dtype: dtype,
      device: device,
      stats: stats,
      metric: "GFLOP/s",
      value: gflops(batch, len, stats)
    }
  end

  defp cpu_rows(batch, len) do
    next = rotating(input_sets(batch, len, {:f, 32}, {:f, 32}, :cpu))
    runs = if batch >= 32, do: 50, else: 100
    fwd = Bench.wall_time(:cpu, fwd_fun(next), warmup: 5, runs: runs)
    both = Bench.wall_time(:cpu, fwd_bwd_fun(next), warmup: 5, runs: runs)

    rows = [
      row("scan_forward", batch, len, "f32", :cpu, fwd),
      row("scan_forward_backward", batch, len, "f32", :cpu, both)
    ]

    BenchHelper.report(@csv, rows)
    rows
  end

  test "CPU f32 forward at batch 32, L 60: >= 5 GFLOP/s (6 flops per (b,t,d,n))" do
    [fwd, _both] = cpu_rows(32, 60)
    assert fwd.value >= 5.0
  end

  test "CPU f32 at batch 1, L 60 (reported)" do
    [fwd, both] = cpu_rows(1, 60)
    assert fwd.value > 0 and both.value > 0
  end

  @gpu_shapes [{1, 60}, {32, 60}, {256, 60}, {256, 180}, {64, 1024}, {8, 4096}]

  for {label, io} <- [{"f32", {:f, 32}}, {"bf16", {:bf, 16}}] do
    @tag :cuda
    test "GPU #{label} io, table shapes of DESIGN.md §7 (reported)" do
      dev = {:cuda, 0}
      io = unquote(Macro.escape(io))
      label = unquote(label)

      for {batch, len} <- @gpu_shapes do
        next = rotating(input_sets(batch, len, io, {:f, 32}, dev))
        f = fwd_fun(next)
        fb = fwd_bwd_fun(next)

        BenchHelper.report(@csv, [
          row("scan_forward", batch, len, label, dev, Bench.device_time(dev, f, runs: 50)),
          row("scan_forward_wall", batch, len, label, dev, Bench.wall_time(dev, f, runs: 50)),
          row(
            "scan_forward_backward",
            batch,
            len,
            label,
            dev,
            Bench.device_time(dev, fb, runs: 50)
          ),
          row(
            "scan_forward_backward_wall",
            batch,
            len,
            label,
            dev,
            Bench.wall_time(dev, fb, runs: 50)
          )
        ])
      end
    end
  end
end
