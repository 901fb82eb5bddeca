defmodule Mambex.ExecutorBench do
  # The two executor modes (Mambex.set_executor/1) on latency-bound work,
  # wall time from Elixir: 1000 chained adds on 1 KiB (per op), the one-frame
  # step of the 2-layer DESIGN.md §7 model at batch 1 (frame binary in,
  # logits binary out), and its training step at batch 32, L 60 (:tf32).
  # Appends to bench/results/executor.csv.
  use ExUnit.Case, async: false

  alias Mambex.{Bench, Model, Ops, Tensor}

  defp rows(device, mode) do
    Mambex.set_executor(mode)

    chain =
      Bench.wall_time(device, fn ->
        Enum.reduce(1..1000, Tensor.ones({256}, device: device), fn _, acc -> Ops.add(acc, 1.0) end)
      end, warmup: 3, runs: 21)

    m = Model.new(features: 256, outputs: 64, d_model: 256, n_layers: 2, seed: 1, device: device)
    :rand.seed(:exsss, {1, 2, 3})
    bin = for _ <- 1..256, into: <<>>, do: <<:rand.uniform() * 2 - 1::float-32-native>>
    Process.put(:bench_state, Model.init_state(m, 1))

    step =
      Bench.wall_time(device, fn ->
        frame = Tensor.from_binary(bin, {:f, 32}, shape: {1, 256}, device: device)
        {logits, state} = Model.step(m, Process.get(:bench_state), frame)
        Process.put(:bench_state, state)
        Tensor.to_binary(logits)
      end, warmup: 10, runs: 200)

    opt = Model.optimizer(m, max_grad_norm: 1.0)
    x = Tensor.random_uniform({32, 60, 256}, seed: 2, min: -1.0, max: 1.0, device: device)
    y = Tensor.fill({32, 60}, 3, type: {:s, 32}, device: device)
    train = Bench.wall_time(device, fn -> Model.train_step(m, opt, x, y, precision: :tf32) end, warmup: 3, runs: 30)
    Mambex.set_executor(:dirty)

    per_op = Map.new(chain, fn {k, v} -> {k, if(k in [:median, :p10, :p90, :p99], do: v / 1000, else: v)} end)

    [
      %{op: "chained_add_per_op", shapes: "1000 x {256}", dtype: "f32/#{mode}", device: device, stats: per_op},
      %{op: "model_step_wall", shapes: "layers=2 B=1 d=256 f=256 c=64", dtype: "f32/#{mode}", device: device, stats: step},
      %{op: "model_train_step", shapes: "layers=2 B=32 L=60 d=256 f=256 c=64", dtype: "f32/tf32/#{mode}", device: device, stats: train}
    ]
  end

  @tag :cuda
  test "dirty vs inline executor on CUDA" do
    device = Mambex.default_device()
    BenchHelper.report("executor.csv", rows(device, :dirty) ++ rows(device, :inline))
  end
end
