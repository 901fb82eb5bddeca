defmodule Mambex.ModelStepBench do
  # Recurrent inference of the DESIGN.md §7 model (features 256, d_model
  # 256, 64 outputs): one Model.step/4 per frame, and the 60-frame window
  # forward (Model.forward_with_state/3). Wall time from Elixir includes
  # the frame going in (Tensor.from_binary(..., device:)) and the logits
  # coming out (Tensor.to_binary); device time (CUDA events) is the step
  # alone, with the frame already on the device. Appends to
  # bench/results/model_step.csv.
  use ExUnit.Case, async: false

  alias Mambex.{Bench, Model, Stepper, Tensor}

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

  defp step_device(device, layers, batch, fused \\ :auto) do
    m = model(device, layers)
    frame = Tensor.from_binary(frame_bin(batch, 1), {:f, 32}, shape: {batch, 256}, device: device)
    state = Model.init_state(m, batch)
    # the same state every run: the work is the same as the carried one's
    fun = fn -> Model.step(m, state, frame, fused: fused) end
    how = if fused == false, do: "device ops", else: "device fused"
    row("model_step", layers, batch, 1, device, how, Bench.device_time(device, fun, warmup: 10, runs: 200))
  end

  # Mambex.Stepper: one NIF call per frame (binary in, replayed graph,
  # binary out). Wall time from Elixir; the p99 goes in the metric column.
  defp stepper_wall(device, layers, batch, runs, opts \\ []) do
    m = model(device, layers)
    bin = frame_bin(batch, 1)
    Process.put(:bench_stepper, Stepper.new(m, batch, opts))

    fun = fn ->
      {logits, st} = Stepper.step(Process.get(:bench_stepper), bin)
      Process.put(:bench_stepper, st)
      logits
    end

    stats = Bench.wall_time(device, fun, warmup: 50, runs: runs)
    info = Stepper.info(Process.get(:bench_stepper))
    Stepper.free(Process.get(:bench_stepper))
    label = "stepper #{Mambex.executor()} graphed=#{info.graphed} kernel=#{info.kernel}#{if opts[:blocks], do: " blocks=#{opts[:blocks]}", else: ""}"
    Map.merge(row("model_step", layers, batch, 1, device, label, stats), %{metric: "p99_us", value: stats.p99})
  end

  # The plan's whole replay (the kernel reading the frame from and writing
  # the logits to pinned host memory) in device time.
  defp stepper_device(device, layers, batch, opts) do
    m = model(device, layers)
    bin = frame_bin(batch, 1)
    st = Stepper.new(m, batch, opts)
    fun = fn -> Stepper.step(st, bin) end
    stats = Bench.device_time(device, fun, warmup: 20, runs: 200)
    info = Stepper.info(st)
    Stepper.free(st)

    how =
      case info.kernel do
        :step -> "step kernel channels=#{if opts[:step_channels] in [nil, 0], do: "auto", else: opts[:step_channels]}"
        :general -> "general kernel grid=#{opts[:blocks]}"
      end

    row("model_step", layers, batch, 1, device, "device stepper replay #{how}", stats)
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

  defp window_device(device, layers, batch, len, fused \\ :auto) do
    m = model(device, layers)
    x = Tensor.from_binary(frame_bin(batch, len), {:f, 32}, shape: {batch, len, 256}, device: device)
    fun = fn -> Model.forward_with_state(m, x, fused: fused) end
    how = if fused == false, do: "device ops", else: "device fused"
    row("model_window_forward", layers, batch, len, device, how, Bench.device_time(device, fun, warmup: 5, runs: 100))
  end

  @tag :cuda
  test "GPU step and window" do
    d = {:cuda, 0}

    rows =
      for layers <- [2, 4], batch <- [1, 256] do
        [step_wall(d, layers, batch, 200), step_device(d, layers, batch), step_device(d, layers, batch, false)]
      end

    sweep =
      for layers <- [2, 4], batch <- [1, 8], opts <- [[], [step_channels: 4], [step_channels: 8], [step_channels: 16], [blocks: 132]] do
        stepper_device(d, layers, batch, opts)
      end

    steppers =
      for layers <- [2, 4], mode <- [:dirty, :inline] do
        Mambex.set_executor(mode)
        r = stepper_wall(d, layers, 1, 2000)
        Mambex.set_executor(:dirty)
        r
      end

    agents = for layers <- [2, 4], do: stepper_wall(d, layers, 256, 500)

    windows =
      for layers <- [2, 4] do
        [window_wall(d, layers, 1, 60, 50), window_device(d, layers, 1, 60), window_device(d, layers, 1, 60, false)]
      end

    BenchHelper.report("model_step.csv", List.flatten([rows, sweep, steppers, agents, windows]))
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
