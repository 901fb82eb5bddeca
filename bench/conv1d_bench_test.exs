defmodule Mambex.Conv1dBench do
  # Causal depthwise conv1d benchmarks (issue 4). W = 4, C = 512 at batch 256,
  # 32 and 1, L = 60, with and without SiLU (bias always), f32 and bf16 io on
  # the GPU, f32 on the CPU. Each row reports the bytes the op must move
  # (forward: x in, out and the final state out; backward: x and d_out in,
  # dx out; parameters and partial sums are negligible) and the floor at
  # 4.2 TB/s as the % of it reached. Rows go to bench/results/conv1d.csv.
  # Only reported, nothing asserted.
  use ExUnit.Case, async: false

  alias Mambex.{Bench, Conv1d, Tensor}

  @csv "conv1d.csv"
  @width 4
  @bandwidth 4.2e12

  defp bytes_of({:bf, 16}), do: 2
  defp bytes_of({:f, 32}), do: 4

  # input sets rotated so that no run reads inputs left in L2 (60 MB) by the last
  defp input_sets(batch, len, ch, io, device) do
    count = if batch * len * ch * bytes_of(io) * 3 < 256 * 1024 * 1024, do: 4, else: 1

    for k <- 1..count do
      uni = fn shape, type, s ->
        Tensor.random_uniform(shape, seed: 1000 * k + s, min: -1.0, max: 1.0, type: type, device: device)
      end

      %{
        x: uni.({batch, len, ch}, io, 1),
        d_out: uni.({batch, len, ch}, io, 2),
        weight: uni.({ch, @width}, {:f, 32}, 3),
        bias: uni.({ch}, {:f, 32}, 4)
      }
    end
  end

  defp rotating(sets) do
    sets = List.to_tuple(sets)
    counter = :counters.new(1, [])

    fn ->
      :counters.add(counter, 1, 1)
      elem(sets, rem(:counters.get(counter, 1), tuple_size(sets)))
    end
  end

  defp row(op, {batch, len, ch}, silu, label, device, stats, bytes) do
    floor_us = bytes / @bandwidth * 1.0e6

    %{
      op: op,
      shapes: "B=#{batch} L=#{len} C=#{ch} W=#{@width} silu=#{silu} bytes=#{round(bytes)} floor_us=#{Float.round(floor_us, 2)}",
      dtype: label,
      device: device,
      stats: stats,
      metric: "% of 4.2 TB/s floor",
      value: 100.0 * floor_us / stats.median
    }
  end

  defp measure({batch, len, ch} = shape, io, label, device, silu, timer) do
    next = rotating(input_sets(batch, len, ch, io, device))
    es = bytes_of(io)

    fwd = fn ->
      x = next.()
      {out, fin, _ctx} = Conv1d.forward(x.x, x.weight, bias: x.bias, silu: silu)
      [out, fin]
    end

    # the backward alone: contexts are made outside the timed region
    ctxs =
      for _ <- 1..4 do
        x = next.()
        {out, fin, ctx} = Conv1d.forward(x.x, x.weight, bias: x.bias, silu: silu)
        Tensor.free(out)
        Tensor.free(fin)
        {ctx, x.d_out}
      end

    next_ctx = rotating(ctxs)

    bwd = fn ->
      {ctx, d_out} = next_ctx.()
      Conv1d.backward(ctx, d_out) |> Map.values()
    end

    n = batch * len * ch
    fbytes = 2.0 * n * es + batch * ch * (@width - 1) * 4
    bbytes = 3.0 * n * es

    [
      row("conv1d_forward", shape, silu, label, device, timer.(device, fwd), fbytes),
      row("conv1d_backward", shape, silu, label, device, timer.(device, bwd), bbytes)
    ]
  end

  @gpu_shapes [{256, 60, 512}, {32, 60, 512}, {1, 60, 512}]

  for {label, io} <- [{"f32", {:f, 32}}, {"bf16", {:bf, 16}}] do
    @tag :cuda
    test "GPU #{label} io (reported)" do
      dev = {:cuda, 0}

      rows =
        for shape <- @gpu_shapes, silu <- [false, true] do
          measure(shape, unquote(Macro.escape(io)), unquote(label), dev, silu,
            &Bench.device_time(&1, &2, runs: 100)
          )
        end

      BenchHelper.report(@csv, List.flatten(rows))
    end
  end

  test "CPU f32 (reported)" do
    rows =
      for shape <- [{32, 60, 512}, {1, 60, 512}], silu <- [false, true] do
        measure(shape, {:f, 32}, "f32", :cpu, silu, &Bench.wall_time(&1, &2, runs: 50))
      end

    BenchHelper.report(@csv, List.flatten(rows))
  end
end
