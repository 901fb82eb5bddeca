defmodule Mambex.ModelBench do
  # Training-step time of the DESIGN.md §7 model (features 256, d_model 256,
  # 64 classes, cross-entropy on every step, AdamW with clipping), from
  # Elixir: wall time of one train_step call plus reading nothing (the next
  # step is chained), measured as the median of per-step times with a sync
  # after each step. Appends to bench/results/model.csv.
  use ExUnit.Case, async: false

  alias Mambex.{Bench, Model, Tensor}

  defp step_time(device, layers, batch, len, precision, runs) do
    model = Model.new(features: 256, outputs: 64, d_model: 256, n_layers: layers, seed: 1, device: device)
    opt = Model.optimizer(model, lr: 1.0e-3, max_grad_norm: 1.0)
    x = Tensor.random_uniform({batch, len, 256}, seed: 2, min: -1.0, max: 1.0, device: device)

    y =
      Tensor.random_uniform({batch, len}, seed: 3, min: 0.0, max: 64.0, device: device)
      |> Mambex.Ops.cast({:s, 32})

    fun = fn -> Model.train_step(model, opt, x, y, precision: precision) end
    stats = Bench.wall_time(device, fun, warmup: 3, runs: runs)
    %{op: "model_train_step", shapes: "layers=#{layers} B=#{batch} L=#{len} d=256 f=256 c=64",
      dtype: "f32/#{precision}", device: device, stats: stats}
  end

  @tag :cuda
  test "GPU training step" do
    rows =
      for {layers, b, l} <- [{2, 256, 60}, {2, 256, 180}, {2, 32, 60}, {4, 256, 60}, {4, 256, 180}],
          prec <- [:tf32, :fp32],
          do: step_time({:cuda, 0}, layers, b, l, prec, 20)

    BenchHelper.report("model.csv", rows)
  end

  test "CPU training step, 2 layers, batch 8, L 60" do
    BenchHelper.report("model.csv", [step_time(:cpu, 2, 8, 60, :fp32, 5)])
  end
end
