defmodule Mambex.ModelStepBench do
  # Recurrent inference of the DESIGN.md §7 model (features 256, d_model
  # 256, 64 outputs): one Model.step/4 per frame, and the 60-frame window
  # forward (Model.forward_with_state/3). Wall time from Elixir includes
  # the frame going in (Tensor.from_binary(..., device:)) and the logits
  # coming out (Tensor.to_binary); device time (CUDA events) is the step
  # alone, with the frame already on the device. Appends to
  # bench/results/model_step.csv.
  use ExUnit.Case, async: false

  alias Mambex.{Bench, Model, Tensor}

  defp model(device, layers),
    do: Model.new(features: 256, outputs: 64, d_model: 256, n_layers: layers, seed: 1, device: device)

  defp frame_bin(batch, len) do
    :rand.seed(:exsss, {1, 2, 3})
    for _ <- 1..(batch * len * 256), into: <<>>, do: <<:rand.uniform() * 2 - 1::float-32-native>>
  end

  defp row(op, layers, batch, len, device, how, stats) do
    %{
      op: op,
      shapes: "layers=#{layers} B=#{batch} L=#{len} d=256 f=256 c=64",
      dtype: "f32/#{how}",
      device: device,
      stats: stats
    }
  end

  # The step from a binary frame to a binary of logits; the state is
  # carried through the runs (a process-dictionary cell: the timed function
  # takes no arguments).
  defp step_wall(device, layers, batch, runs) do
    m = model(device, layers)
    bin = frame_bin(batch, 1)
    Process.put(:bench_state, Model.init_state(m, batch))

    fun = fn ->
      frame = Tensor.from_binary(bin, {:f, 32}, shape: {batch, 256}, device: device)
      {logits, state} = Model.step(m, Process.get(:bench_state), frame)
      Process.put(:bench_state, state)
      Tensor.to_binary(logits)
    end

    row("model_step", layers, batch, 1, device, "wall frame in+logits out", Bench.wall_time(device, fun, warmup: 10, runs: runs))
  end

  defp step_device(device, layers, batch) do
    m = model(device, layers)
    frame = Tensor.from_binary(frame_bin(batch, 1), {:f, 32}, shape: {batch, 256}, device: device)
    state = Model.init_state(m, batch)
    # the same state every run: the work is the same as the carried one's
    fun = fn -> Model.step(m, state, frame) end
    row("model_step", layers, batch, 1, device, "device", Bench.device_time(device, fun, warmup: 10, runs: 100))
  end

  defp window_wall(device, layers, batch, len, runs) do
    m = model(device, layers)
    bin = frame_bin(batch, len)

    fun = fn ->
      x = Tensor.from_binary(bin, {:f, 32}, shape: {batch, len, 256}, device: device)
      {out, state} = Model.forward_with_state(m, x)
      {Tensor.to_binary(out), state}
    end

    row("model_window_forward", layers, batch, len, device, "wall inputs in+outputs out", Bench.wall_time(device, fun, warmup: 3, runs: runs))
  end

  defp window_device(device, layers, batch, len) do
    m = model(device, layers)
    x = Tensor.from_binary(frame_bin(batch, len), {:f, 32}, shape: {batch, len, 256}, device: device)
    fun = fn -> Model.forward_with_state(m, x) end
    row("model_window_forward", layers, batch, len, device, "device", Bench.device_time(device, fun, warmup: 5, runs: 50))
  end

  @tag :cuda
  test "GPU step and window" do
    d = {:cuda, 0}

    rows =
      for layers <- [2, 4], batch <- [1, 256] do
        [step_wall(d, layers, batch, 200), step_device(d, layers, batch)]
      end
      |> List.flatten()

    rows = rows ++ for layers <- [2, 4], do: [window_wall(d, layers, 1, 60, 50), window_device(d, layers, 1, 60)]
    BenchHelper.report("model_step.csv", List.flatten(rows))
  end

  test "CPU step (batch 1, 2 layers) and 60-frame window (batch 1)" do
    rows = [
      step_wall(:cpu, 2, 1, 200),
      step_wall(:cpu, 4, 1, 100),
      window_wall(:cpu, 2, 1, 60, 20)
    ]

    BenchHelper.report("model_step.csv", rows)
  end
end
