defmodule Mambex.LossBench do
  # Loss benchmarks (issue 4: training building blocks). Cross-entropy
  # forward + gradient and MSE forward + gradient, on the CPU and (tagged
  # :cuda) on the GPU. Each test prints its figures and appends them to
  # bench/results/loss.csv with the bytes the op must move (read the inputs
  # once, write the gradient once) and that figure's share of the bandwidth
  # floor at 4.2 TB/s ("% of floor" = floor time / measured time). Nothing is
  # asserted but that the calls run.
  use ExUnit.Case, async: false

  alias Mambex.{Bench, Loss, Tensor}

  @csv "loss.csv"
  @bw 4.2e12

  defp elsize({_, bits}), do: div(bits, 8)

  # Input sets rotate so that no run reads inputs left in L2 (60 MB) by the
  # previous one.
  defp sets(bytes), do: if(bytes < 256 * 1024 * 1024, do: 4, else: 1)

  defp xent_inputs(rows, c, io, device) do
    bytes = rows * c * elsize(io)

    for k <- 1..sets(bytes) do
      lt = Tensor.random_uniform({rows, c}, seed: 10 * k, min: -6.0, max: 6.0, type: io, device: device)
      targets = for r <- 0..(rows - 1), into: <<>>, do: <<rem(r * 7919 + k, c)::signed-32-native>>
      tt = Tensor.from_binary(targets, {:s, 32}, shape: {rows}, device: device)
      {lt, tt}
    end
  end

  defp mse_inputs(shape, io, device) do
    n = Tuple.product(shape)

    for k <- 1..sets(2 * n * elsize(io)) do
      {Tensor.random_uniform(shape, seed: 20 * k, type: io, device: device),
       Tensor.random_uniform(shape, seed: 20 * k + 1, type: io, device: device)}
    end
  end

  defp rotating(sets) do
    t = List.to_tuple(sets)
    counter = :counters.new(1, [])

    fn ->
      :counters.add(counter, 1, 1)
      elem(t, rem(:counters.get(counter, 1), tuple_size(t)))
    end
  end

  defp row(op, shapes, io, device, stats, bytes) do
    floor_us = bytes / @bw * 1.0e6

    %{
      op: op,
      shapes: "#{shapes} bytes=#{bytes} floor_us=#{Float.round(floor_us, 2)}",
      dtype: label(io),
      device: device,
      stats: stats,
      metric: "% of floor",
      value: 100.0 * floor_us / stats.median
    }
  end

  defp label({:f, 32}), do: "f32"
  defp label({:bf, 16}), do: "bf16"
  defp label({:f, 64}), do: "f64"

  defp time(device, fun, runs) do
    if device == :cpu,
      do: Bench.wall_time(device, fun, warmup: 3, runs: runs),
      else: Bench.device_time(device, fun, runs: runs)
  end

  defp xent_rows(rows, c, io, device, opts \\ [], runs \\ 50) do
    next = rotating(xent_inputs(rows, c, io, device))

    fun = fn ->
      {lt, tt} = next.()
      Loss.cross_entropy(lt, tt, opts)
    end

    bytes = 2 * rows * c * elsize(io) + 4 * rows
    tag = if opts == [], do: "", else: " " <> inspect(Keyword.keys(opts))

    r = [row("cross_entropy_fwd_grad" <> tag, "rows=#{rows} C=#{c}", io, device, time(device, fun, runs), bytes)]

    r =
      if device == :cpu,
        do: r,
        else: r ++ [row("cross_entropy_fwd_grad_wall" <> tag, "rows=#{rows} C=#{c}", io, device,
                        Bench.wall_time(device, fun, runs: runs), bytes)]

    BenchHelper.report(@csv, r)
  end

  defp mse_rows(shape, io, device, runs \\ 50) do
    next = rotating(mse_inputs(shape, io, device))

    fun = fn ->
      {p, y} = next.()
      Loss.mse(p, y)
    end

    bytes = 3 * Tuple.product(shape) * elsize(io)
    BenchHelper.report(@csv, [row("mse_fwd_grad", inspect(shape), io, device, time(device, fun, runs), bytes)])
  end

  test "CPU f32 (reported)" do
    xent_rows(15_360, 64, {:f, 32}, :cpu, [], 20)
    xent_rows(15_360, 1024, {:f, 32}, :cpu, [], 5)
    xent_rows(256, 50_257, {:f, 32}, :cpu, [], 5)
    mse_rows({15_360, 256}, {:f, 32}, :cpu, 10)
  end

  for {label, io} <- [{"f32", {:f, 32}}, {"bf16", {:bf, 16}}] do
    @tag :cuda
    test "GPU #{label} (reported)" do
      dev = {:cuda, 0}
      io = unquote(Macro.escape(io))
      xent_rows(15_360, 64, io, dev)
      w = Tensor.random_uniform({64}, seed: 3, min: 0.5, max: 2.0, device: dev)
      xent_rows(15_360, 64, io, dev, weights: w, ignore_index: -100)
      xent_rows(15_360, 1024, io, dev)
      xent_rows(256, 50_257, io, dev)
      mse_rows({15_360, 256}, io, dev)
    end
  end
end
