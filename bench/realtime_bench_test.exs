defmodule Mambex.RealtimeBench do
  # Issue 6's real-time check: 600 frames at 60 FPS (10 s) through the
  # one-frame step of the 2-layer DESIGN.md §7 model at batch 1, from Elixir
  # (Mambex.Stepper: frame binary in, logits binary out), while one busy process per
  # scheduler keeps every scheduler loaded. Reports the per-frame latency
  # distribution and the worst frame; on CUDA asserts that no frame takes
  # over 1 ms. Run it with each executor mode. Appends to
  # bench/results/realtime.csv.
  use ExUnit.Case, async: false

  alias Mambex.{Bench, Model, Stepper}

  @frames 600
  @period_us 16_667

  defp run(device, mode) do
    Mambex.set_executor(mode)
    m = Model.new(features: 256, outputs: 64, d_model: 256, n_layers: 2, seed: 1, device: device)
    :rand.seed(:exsss, {4, 5, 6})
    frames = for _ <- 1..8, do: for(_ <- 1..256, into: <<>>, do: <<:rand.uniform() * 2 - 1::float-32-native>>)
    frames = List.to_tuple(frames)

    # Mambex.Stepper: the captured plan on CUDA, op by op on the CPU
    step = fn st, i ->
      {_logits, st} = Stepper.step(st, elem(frames, rem(i, 8)))
      st
    end

    # warm-up (allocator pools, plans)
    state = Enum.reduce(1..20, Stepper.new(m, 1), fn i, s -> step.(s, i) end)

    busy =
      for _ <- 1..System.schedulers_online() do
        spawn(fn -> spin(0) end)
      end

    t0 = System.monotonic_time(:microsecond)

    {_state, lat} =
      Enum.reduce(0..(@frames - 1), {state, []}, fn i, {s, acc} ->
        # wait for the frame's slot
        due = t0 + i * @period_us
        wait = due - System.monotonic_time(:microsecond)
        if wait > 1000, do: Process.sleep(div(wait, 1000))
        t1 = System.monotonic_time(:nanosecond)
        s = step.(s, i)
        {s, [(System.monotonic_time(:nanosecond) - t1) / 1000 | acc]}
      end)

    Enum.each(busy, &Process.exit(&1, :kill))
    Mambex.set_executor(:dirty)
    stats = Bench.stats(lat)

    %{
      op: "realtime_step_60fps",
      shapes: "layers=2 B=1 frames=#{@frames} busy=#{System.schedulers_online()}",
      dtype: "f32/#{mode}",
      device: device,
      stats: stats,
      metric: "max_us",
      value: Enum.max(lat)
    }
  end

  defp spin(n), do: spin(rem(n + 1, 1_000_000))

  # With every normal scheduler busy, a NIF that hops to a dirty scheduler
  # must then wait for a normal scheduler's time slice to get back: the
  # :dirty executor measured 1.8 ms median, 7.7 ms worst a frame here
  # (a65d626). The :inline executor runs the Stepper's one NIF call on the
  # calling scheduler: that is the real-time configuration, and the one
  # asserted; :dirty is reported.
  @tag :cuda
  test "600 frames at 60 FPS on CUDA with busy schedulers: no frame over 1 ms (inline executor)" do
    rows = [run({:cuda, 0}, :inline), run({:cuda, 0}, :dirty)]
    BenchHelper.report("realtime.csv", rows)
    [inline | _] = rows
    assert inline.value <= 1000.0, "#{inline.dtype}: worst frame #{inline.value} us"
  end

  test "600 frames at 60 FPS on the CPU with busy schedulers (reported)" do
    BenchHelper.report("realtime.csv", [run(:cpu, :dirty)])
  end
end
