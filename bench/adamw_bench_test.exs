defmodule Mambex.AdamWBench do
  # AdamW benchmarks (issue 4: training building blocks). Two parameter sets
  # of about a million f32 parameters:
  #   - one tensor of 2^20 elements;
  #   - the 25 tensors of a 2-layer Mamba model, d_model 256 (expand 2,
  #     d_state 16, d_conv 4, dt_rank 16): per layer norm (256), in_proj
  #     (1024, 256), conv weight (512, 4) and bias (512), x_proj (48, 512),
  #     dt_proj (512, 16) and bias (512), A_log (512, 16), D (512), out_proj
  #     (256, 512); plus the input Linear 256->256, the final norm and the
  #     Linear 256->64 head: 958,528 parameters.
  # Each with and without clipping (max_grad_norm 1.0, which also computes the
  # norm). Bytes moved: 28 per parameter (read p, g, m, v; write p, m, v), 32
  # with clipping (the norm pass reads g once more). The floor is 28 bytes per
  # parameter at 4.2 TB/s (about 6.4 us for 958,528, 7.0 us for 2^20);
  # "pct_floor" is floor / median. Four optimiser states (each with its own
  # parameters and gradients, 4 x 28 MB, more than the 60 MB L2) are
  # rotated so that no run finds its inputs in L2. Rows go to
  # bench/results/adamw.csv; the CUDA target of the issue (<= 15 us for 1 M
  # parameters) is asserted.
  use ExUnit.Case, async: false

  alias Mambex.{AdamW, Bench, Tensor}

  @csv "adamw.csv"
  @floor_bw 4.2e12

  defp mamba_shapes do
    layer = fn l ->
      [
        {"l#{l}.norm", {256}},
        {"l#{l}.in_proj", {1024, 256}},
        {"l#{l}.conv_w", {512, 4}},
        {"l#{l}.conv_b", {512}},
        {"l#{l}.x_proj", {48, 512}},
        {"l#{l}.dt_proj_w", {512, 16}},
        {"l#{l}.dt_proj_b", {512}},
        {"l#{l}.a_log", {512, 16}},
        {"l#{l}.d", {512}},
        {"l#{l}.out_proj", {256, 512}}
      ]
    end

    [{"embed_w", {256, 256}}, {"embed_b", {256}}] ++
      layer.(0) ++ layer.(1) ++ [{"norm_f", {256}}, {"head_w", {64, 256}}, {"head_b", {64}}]
  end

  defp numel(shape), do: shape |> Tuple.to_list() |> Enum.product()

  defp state_set(shapes, device, clip, seed) do
    params =
      for {{name, shape}, i} <- Enum.with_index(shapes), into: %{} do
        {name, Tensor.random_uniform(shape, seed: seed + i, min: -0.1, max: 0.1, device: device)}
      end

    grads =
      for {{name, shape}, i} <- Enum.with_index(shapes), into: %{} do
        {name,
         Tensor.random_uniform(shape, seed: seed + 1000 + i, min: -0.01, max: 0.01, device: device)}
      end

    st = AdamW.init(params, lr: 1.0e-3, max_grad_norm: clip)
    {st, params, grads}
  end

  defp bench(label, shapes, device, clip, runs) do
    sets = for k <- 1..4, do: state_set(shapes, device, clip, 10_000 * k)
    states = :ets.new(:adamw_bench, [:set, :private])
    for {s, k} <- Enum.with_index(sets), do: :ets.insert(states, {k, s})
    counter = :counters.new(1, [])

    fun = fn ->
      :counters.add(counter, 1, 1)
      k = rem(:counters.get(counter, 1), 4)
      [{^k, {st, p, g}}] = :ets.lookup(states, k)
      :ets.insert(states, {k, {AdamW.step(st, p, g), p, g}})
      nil
    end

    stats =
      if device == :cpu,
        do: Bench.wall_time(device, fun, warmup: 3, runs: runs),
        else: Bench.device_time(device, fun, warmup: 10, runs: runs)

    n = shapes |> Enum.map(fn {_, s} -> numel(s) end) |> Enum.sum()
    bytes = if clip, do: 32 * n, else: 28 * n
    floor_us = 28 * n / @floor_bw * 1.0e6

    %{
      op: if(clip, do: "adamw_clip", else: "adamw"),
      shapes:
        "#{label}: #{length(shapes)} tensors, #{n} params, bytes=#{bytes}, floor_us=#{Float.round(floor_us, 2)}",
      dtype: "f32",
      device: device,
      stats: stats,
      metric: "pct_floor",
      value: 100.0 * floor_us / stats.median
    }
  end

  defp sets, do: [{"one tensor", [{"w", {1_048_576}}]}, {"mamba 2-layer d256", mamba_shapes()}]

  test "CPU rows (reported)" do
    rows =
      for {label, shapes} <- sets(), clip <- [nil, 1.0], do: bench(label, shapes, :cpu, clip, 50)

    BenchHelper.report(@csv, rows)
  end

  @tag :cuda
  test "CUDA: 1 M parameters in <= 15 us" do
    rows =
      for {label, shapes} <- sets(),
          clip <- [nil, 1.0],
          do: bench(label, shapes, {:cuda, 0}, clip, 200)

    BenchHelper.report(@csv, rows)
    # the issue's target is asserted on the plain update; with clipping the
    # norm is a second launch over the gradients (reported, not asserted)
    for r <- rows, r.op == "adamw",
        do: assert(r.stats.median <= 15.0, "#{r.op} #{r.shapes}: #{r.stats.median} us")
  end
end
