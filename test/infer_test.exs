defmodule Mambex.InferTest do
  # The fused inference path (one persistent CUDA kernel for the whole model)
  # and Mambex.Stepper. References: the same parameters in float64 on the CPU
  # through the op-by-op forward (itself checked by finite differences in
  # model_test.exs), plus the op-by-op f32 forward on the same device.
  # Tolerance: relative error (norm-wise) 1e-5 for f32 against either.
  use ExUnit.Case, async: false

  alias Mambex.{Model, NIF, Ops, Stepper, Tensor}
  import Mambex.TestHelpers

  @tol 1.0e-5

  # A float64 CPU model and the same parameters as f32 on `device`.
  defp model_pair(opts, device, seed \\ 5) do
    m64 = Model.new(opts ++ [seed: seed, type: {:f, 64}, device: :cpu])

    params =
      Map.new(m64.params, fn {k, v} -> {k, v |> Ops.cast({:f, 32}) |> Tensor.to_device(device)} end)

    m32 = %Model{m64 | params: params, device: device, config: %{m64.config | type: {:f, 32}}}
    {m64, m32}
  end

  defp rand_inputs(b, l, f, seed) do
    vals = for i <- 1..(b * l * f), do: :math.sin(seed * 7.3 + i * 1.71) * 0.9 + 0.05
    {make(vals, {:f, 64}, {b, l, f}, :cpu), make(quantize_all(vals, {:f, 32}), {:f, 32}, {b, l, f}, :cpu)}
  end

  defp flags(values, shape, device), do: make(values, {:u, 8}, shape, device)

  defp assert_close(out, ref, label) do
    err = rel_err(read(out), read(ref))
    assert is_number(err) and err <= @tol, "#{label}: relative error #{inspect(err)} > #{@tol}"
  end

  defp state_values(%Model.State{layers: layers}), do: Enum.flat_map(layers, fn {c, s} -> read(c) ++ read(s) end)

  @small [features: 7, outputs: 5, d_model: 24, n_layers: 3, d_state: 4, d_conv: 3]

  describe "cuda fused path" do
    setup ctx, do: seed_rand(ctx)

    @tag :cuda
    test "window forward matches the float64 reference: odd sizes, batch 1, length 1, long windows" do
      device = cuda_device()

      for {opts, b, l} <- [
            {@small, 1, 1},
            {@small, 1, 60},
            {@small, 3, 61},
            {@small, 2, 130},
            {[features: 5, outputs: 3, d_model: 16, n_layers: 1, d_state: 1, d_conv: 1], 2, 9},
            {[features: 9, outputs: 64, d_model: 40, n_layers: 2, d_state: 16, d_conv: 4, dt_rank: 3], 4, 17},
            {[features: 3, outputs: 2, d_model: 8, n_layers: 2, d_state: 32, d_conv: 8], 1, 20}
          ] do
        {m64, m32} = model_pair(opts, device)
        assert Model.fused?(m32)
        {x64, x32} = rand_inputs(b, l, opts[:features], b + l)
        {ref, ref_state} = Model.forward_with_state(m64, x64)
        {out, state} = Model.forward_with_state(m32, Tensor.to_device(x32, device), fused: true)
        label = "#{inspect(opts)} B=#{b} L=#{l}"
        assert Tensor.shape(out) == {b, l, opts[:outputs]}
        assert_close(out, ref, label)
        assert rel_err(state_values(state), state_values(ref_state)) <= @tol, "#{label}: state"
      end
    end

    @tag :cuda
    test "from a state, with resets inside the window (conv and scan), against the reference" do
      device = cuda_device()
      {m64, m32} = model_pair(@small, device)
      {x64, x32} = rand_inputs(3, 25, 7, 11)
      x32 = Tensor.to_device(x32, device)
      # a state from a first window
      {_, s64} = Model.forward_with_state(m64, Tensor.slice(x64, 1, 0, 10))
      {_, s32} = Model.forward_with_state(m32, Tensor.slice(x32, 1, 0, 10), fused: true)
      r = for row <- 0..2, t <- 0..14, do: if({row, t} in [{0, 0}, {0, 9}, {1, 1}, {1, 2}, {2, 14}], do: 1, else: 0)
      {ref, ref_state} = Model.forward_with_state(m64, Tensor.slice(x64, 1, 10, 15), state: s64, reset: flags(r, {3, 15}, :cpu))

      {out, state} =
        Model.forward_with_state(m32, Tensor.slice(x32, 1, 10, 15), state: s32, reset: flags(r, {3, 15}, device), fused: true)

      assert_close(out, ref, "window with resets")
      assert rel_err(state_values(state), state_values(ref_state)) <= @tol
    end

    @tag :cuda
    test "fused steps give the forward over the whole sequence; per-row resets; the old state is untouched" do
      device = cuda_device()
      {m64, m32} = model_pair(@small, device)
      {x64, x32} = rand_inputs(2, 12, 7, 3)
      x32 = Tensor.to_device(x32, device)
      {ref, _} = Model.forward(m64, x64)
      # row 1 resets at step 5: its outputs from 5 on are those of a fresh sequence
      {fresh, _} = Model.forward(m64, x64 |> Tensor.slice(0, 1, 1) |> Tensor.slice(1, 5, 7))
      s0 = Model.init_state(m32, 2)

      {outs, _} =
        Enum.map_reduce(0..11, s0, fn t, st ->
          frame = x32 |> Tensor.slice(1, t, 1) |> Tensor.reshape({2, 7})
          opts = if t == 5, do: [reset: flags([0, 1], {2}, device), fused: true], else: [fused: true]
          {y, st2} = Model.step(m32, st, frame, opts)
          {Tensor.reshape(y, {2, 1, 5}), st2}
        end)

      out = Tensor.concatenate(outs, 1)
      assert_close(Tensor.slice(out, 0, 0, 1), Tensor.slice(ref, 0, 0, 1), "row 0")
      assert_close(out |> Tensor.slice(0, 1, 1) |> Tensor.slice(1, 0, 5), ref |> Tensor.slice(0, 1, 1) |> Tensor.slice(1, 0, 5), "row 1 before")
      assert_close(out |> Tensor.slice(0, 1, 1) |> Tensor.slice(1, 5, 7), fresh, "row 1 after its reset")
      assert Enum.all?(state_values(s0), &(&1 == 0.0))
    end

    @tag :cuda
    test "bit-identical across reruns and across grid sizes" do
      device = cuda_device()
      {_, m32} = model_pair(@small, device)
      {_, x32} = rand_inputs(3, 33, 7, 9)
      x = Tensor.to_device(x32, device)
      {cfg, top, layers} = Model.fused_args(m32, 0)
      {a, _} = NIF.infer(cfg, top, layers, x, nil, nil, false)
      {b, _} = NIF.infer(cfg, top, layers, x, nil, nil, false)
      assert Tensor.to_binary(a) == Tensor.to_binary(b)

      for blocks <- [1, 7, 200] do
        {cfg, top, layers} = Model.fused_args(m32, blocks)
        {c, _} = NIF.infer(cfg, top, layers, x, nil, nil, false)
        assert Tensor.to_binary(c) == Tensor.to_binary(a), "blocks #{blocks}"
      end

      # a step-sized call on the general kernel (a few rows, 8-column
      # tiles): the same bits for grids of any size
      one = Tensor.slice(x, 1, 0, 1)
      {cfg0, top, layers} = Model.fused_args(m32, 0, -1)
      {s0, _} = NIF.infer(cfg0, top, layers, one, nil, nil, false)

      for blocks <- [1, 5, 132] do
        {cfg, top, layers} = Model.fused_args(m32, blocks)
        {c, _} = NIF.infer(cfg, top, layers, one, nil, nil, false)
        assert Tensor.to_binary(c) == Tensor.to_binary(s0), "step, blocks #{blocks}"
      end

      # the step kernel: the same bits on every rerun
      {cfg, top, layers} = Model.fused_args(m32, 0, 5)
      {k1, _} = NIF.infer(cfg, top, layers, one, nil, nil, false)
      {k2, _} = NIF.infer(cfg, top, layers, one, nil, nil, false)
      assert Tensor.to_binary(k1) == Tensor.to_binary(k2)
    end

    # Steps through the step kernel with `channels` per block (0: auto) from
    # a random state, resets on some rows at some steps, against the float64
    # reference stepping the same way.
    defp step_kernel_run(opts, b, steps, channels, device) do
      {m64, m32} = model_pair(opts, device, 7 + b)
      f = opts[:features]
      {x64, x32} = rand_inputs(b, steps, f, b * 3 + channels)
      x32 = Tensor.to_device(x32, device)
      # a non-zero state to start from: the end of a first window
      {x64a, x32a} = rand_inputs(b, 3, f, 17)
      {_, s64} = Model.forward_with_state(m64, x64a)
      {_, s32} = Model.forward_with_state(m32, Tensor.to_device(x32a, device), fused: false)
      {cfg, top, layers} = Model.fused_args(m32, 0, channels)

      Enum.reduce(0..(steps - 1), {s64, s32.layers}, fn t, {st64, st32} ->
        rs = for row <- 0..(b - 1), do: if(rem(row + t, 3) == 2 and t > 0, do: 1, else: 0)
        frame64 = x64 |> Tensor.slice(1, t, 1) |> Tensor.reshape({b, f})
        frame32 = x32 |> Tensor.slice(1, t, 1)
        {ref, st64} = Model.step(m64, st64, frame64, reset: flags(rs, {b}, :cpu))
        {out, st32} = NIF.infer(cfg, top, layers, frame32, flags(rs, {b, 1}, device), st32, false)
        label = "#{inspect(opts)} B=#{b} channels=#{channels} t=#{t}"
        assert_close(Tensor.reshape(out, {b, opts[:outputs]}), ref, label)
        got = Enum.flat_map(st32, fn {c, s} -> read(c) ++ read(s) end)
        assert rel_err(got, state_values(st64)) <= @tol, "#{label}: state"
        {st64, st32}
      end)
    end

    @tag :cuda
    test "step kernel: odd sizes, 1..8 rows, any channels per block, resets, from a state" do
      device = cuda_device()

      for {opts, b, channels} <- [
            {@small, 1, 0},
            {@small, 2, 1},
            {@small, 3, 5},
            {@small, 8, 16},
            {@small, 5, 64},
            {[features: 5, outputs: 3, d_model: 16, n_layers: 1, d_state: 1, d_conv: 1], 2, 0},
            {[features: 9, outputs: 64, d_model: 40, n_layers: 4, d_state: 16, d_conv: 4, dt_rank: 3], 4, 0},
            {[features: 3, outputs: 2, d_model: 8, n_layers: 2, d_state: 32, d_conv: 8], 1, 8},
            {[features: 300, outputs: 70, d_model: 256, n_layers: 2, d_state: 16, d_conv: 4], 1, 0}
          ] do
        step_kernel_run(opts, b, 4, channels, device)
      end
    end

    @tag :cuda
    test "cluster kernel: one row, odd sizes, two scan pairs a thread, resets, from a state; bit-identical reruns" do
      device = cuda_device()

      # Each model's one-row stepper must run on the cluster kernel (else the
      # runs below would test the step kernel). The sizes reach its corners:
      # one state (lp 1) and no conv state; d_model not a multiple of 4 (the
      # scalar push) with a cluster of 4; a block of one channel with 32
      # states; 32 channels x 32 states (two scan pairs a thread); features
      # and outputs that do not divide by the cluster.
      cases = [
        @small,
        [features: 5, outputs: 3, d_model: 16, n_layers: 1, d_state: 1, d_conv: 1],
        [features: 13, outputs: 9, d_model: 22, n_layers: 2, d_state: 7, d_conv: 2],
        [features: 3, outputs: 2, d_model: 8, n_layers: 2, d_state: 32, d_conv: 8],
        [features: 9, outputs: 64, d_model: 40, n_layers: 4, d_state: 16, d_conv: 4, dt_rank: 3],
        [features: 300, outputs: 70, d_model: 256, n_layers: 2, d_state: 16, d_conv: 4],
        [features: 17, outputs: 6, d_model: 256, n_layers: 1, d_state: 32, d_conv: 4]
      ]

      for opts <- cases do
        {_, m32} = model_pair(opts, device, 8)
        st = Stepper.new(m32, 1)
        assert Stepper.info(st).kernel == :cluster, "#{inspect(opts)}"
        Stepper.free(st)
        step_kernel_run(opts, 1, 4, 0, device)
      end

      {_, m32} = model_pair(@small, device)
      {_, x32} = rand_inputs(1, 1, 7, 9)
      x = Tensor.to_device(x32, device)
      {cfg, top, layers} = Model.fused_args(m32, 0)
      {a, _} = NIF.infer(cfg, top, layers, x, nil, nil, false)

      for _ <- 1..3 do
        {b, _} = NIF.infer(cfg, top, layers, x, nil, nil, false)
        assert Tensor.to_binary(b) == Tensor.to_binary(a)
      end
    end

    @tag :cuda
    test "step kernel: chosen for one step of at most 8 rows; asked-for channels it cannot use raise" do
      device = cuda_device()
      {_, m32} = model_pair(@small, device)
      st = Stepper.new(m32, 3)
      assert Stepper.info(st).kernel == :step
      st9 = Stepper.new(m32, 8, blocks: 4)
      assert Stepper.info(st9).kernel == :general
      {cfg, top, layers} = Model.fused_args(m32, 0, 3)
      x = Tensor.zeros({9, 1, 7}, device: device)
      assert_raise ArgumentError, ~r/step_channels 3 cannot be used/, fn -> NIF.infer(cfg, top, layers, x, nil, nil, false) end
      assert_raise ArgumentError, ~r/choose different kernels/, fn -> NIF.infer(put_elem(cfg, 8, 4), top, layers, x, nil, nil, false) end
      assert_raise ArgumentError, ~r/step_channels must be/, fn -> NIF.infer(put_elem(cfg, 9, 65), top, layers, x, nil, nil, false) end
      Stepper.free(st)
      Stepper.free(st9)
    end

    @tag :cuda
    test "Stepper: one call per frame, graph replay, equals the reference; resets; rebatch; update_model" do
      device = cuda_device()
      {m64, m32} = model_pair(@small, device)
      {x64, x32} = rand_inputs(3, 9, 7, 21)
      {ref, _} = Model.forward(m64, x64)
      st = Stepper.new(m32, 3)
      assert %{mode: :graph, batch: 3, graphed: true, device_bytes: bytes} = Stepper.info(st)
      assert bytes > 0
      frames = for t <- 0..8, do: x32 |> Tensor.slice(1, t, 1) |> Tensor.to_binary()

      {logits, st} =
        Enum.map_reduce(frames, st, fn f, st ->
          {y, st} = Stepper.step(st, f)
          assert byte_size(y) == 3 * 5 * 4
          {y, st}
        end)

      out = logits |> Enum.map(&Tensor.from_binary(&1, {:f, 32}, shape: {3, 1, 5})) |> Tensor.concatenate(1)
      assert_close(out, ref, "stepper")

      # a reset of row 2 at the next frame: that row starts afresh
      {y, st} = Stepper.step(st, hd(frames), reset: <<0, 0, 1>>)
      {first, _} = Model.forward(m64, x64 |> Tensor.slice(0, 2, 1) |> Tensor.slice(1, 0, 1))
      got = y |> Tensor.from_binary({:f, 32}, shape: {3, 5}) |> Tensor.slice(0, 2, 1)
      assert rel_err(read(got), read(first)) <= @tol

      # another batch: a new plan from zero states
      one = x32 |> Tensor.slice(0, 0, 1) |> Tensor.slice(1, 0, 1) |> Tensor.to_binary()
      {y1, st1} = Stepper.step(st, one)
      assert st1.batch == 1 and Stepper.info(st1).batch == 1
      {first0, _} = Model.forward(m64, x64 |> Tensor.slice(0, 0, 1) |> Tensor.slice(1, 0, 1))
      assert rel_err(decode(y1, {:f, 32}), read(first0)) <= @tol

      # new parameters, same state
      m2 = %Model{m32 | params: Map.new(m32.params, fn {k, v} -> {k, Ops.multiply(v, 1.0)} end)}
      st2 = Stepper.update_model(st1, m2)
      {_, _} = Stepper.step(st2, one)
      Stepper.free(st2)
      assert_raise ArgumentError, ~r/freed/, fn -> Stepper.step(st2, one) end
    end

    @tag :cuda
    test "plans and fused calls leak no device memory" do
      device = cuda_device()

      assert_no_leak(device, fn ->
        {_, m32} = model_pair(@small, device)
        st = Stepper.new(m32, 2)
        frame = :binary.copy(<<0.5::float-32-native>>, 14)
        {_, st} = Stepper.step(st, frame)
        {_, _st} = Stepper.step(st, frame, reset: <<1, 0>>)
        Stepper.free(st)
        st3 = Stepper.new(m32, 4)
        {_, _} = Stepper.step(st3, :binary.copy(<<0.5::float-32-native>>, 28))
        # st3 is dropped without free: the destructor releases it
        {_, x} = rand_inputs(2, 5, 7, 1)
        {_, _} = Model.forward_with_state(m32, Tensor.to_device(x, device), fused: true)
      end)
    end

    @tag :cuda
    test "misuse of the fused NIFs raises ArgumentError naming the argument" do
      device = cuda_device()
      {_, m32} = model_pair(@small, device)
      {cfg, top, layers} = Model.fused_args(m32, 0)
      {_, x} = rand_inputs(2, 3, 7, 1)
      x = Tensor.to_device(x, device)
      state = Model.init_state(m32, 2)

      assert_raise ArgumentError, ~r/infer: x must/, fn -> NIF.infer(cfg, top, layers, :bad, nil, nil, false) end
      assert_raise ArgumentError, ~r/layers\[1\] conv.weight/, fn ->
        bad = List.update_at(layers, 1, &List.replace_at(&1, 3, Tensor.zeros({1, 1}, device: device)))
        NIF.infer(cfg, top, bad, x, nil, nil, false)
      end

      assert_raise ArgumentError, ~r/in.weight must be on a CUDA/, fn ->
        NIF.infer(cfg, [Tensor.zeros({7, 24}) | tl(top)], layers, x, nil, nil, false)
      end

      assert_raise ArgumentError, ~r/d_state/, fn -> NIF.infer(put_elem(cfg, 3, 33), top, layers, x, nil, nil, false) end
      assert_raise ArgumentError, ~r/reset/, fn -> NIF.infer(cfg, top, layers, x, flags([1], {1, 1}, device), nil, false) end
      assert_raise ArgumentError, ~r/in_place needs states/, fn -> NIF.infer(cfg, top, layers, x, nil, nil, true) end
      freed = Tensor.zeros({2, 3, 7}, device: device)
      Tensor.free(freed)
      assert_raise ArgumentError, ~r/x was freed/, fn -> NIF.infer(cfg, top, layers, freed, nil, nil, false) end

      # the two layers' states sharing memory
      [{c0, s0} | rest] = state.layers
      shared = [{c0, s0}, {c0, s0} | tl(rest)]
      assert_raise ArgumentError, ~r/shares memory/, fn -> NIF.infer_plan_new(cfg, top, layers, shared) end
      assert_raise ArgumentError, ~r/shares memory/, fn -> NIF.infer(cfg, top, layers, x, nil, shared, true) end

      plan = NIF.infer_plan_new(cfg, top, layers, state.layers)
      assert_raise ArgumentError, ~r/frames must be a binary of 56 bytes/, fn -> NIF.infer_plan_step(plan, <<1, 2>>, nil) end
      assert_raise ArgumentError, ~r/resets/, fn -> NIF.infer_plan_step(plan, :binary.copy(<<0::32>>, 14), <<1>>) end
      assert_raise ArgumentError, ~r/plan must be/, fn -> NIF.infer_plan_step(make_ref(), <<>>, nil) end
      NIF.infer_plan_free(plan)
      assert NIF.infer_plan_free(plan) == :ok

      st = Stepper.new(m32, 2)
      assert_raise ArgumentError, ~r/frames must be/, fn -> Stepper.step(st, <<1, 2, 3>>) end
      assert_raise ArgumentError, ~r/:reset/, fn -> Stepper.step(st, :binary.copy(<<0::32>>, 14), reset: <<1>>) end
    end
  end

  describe "cpu" do
    setup ctx, do: seed_rand(ctx)

    test "Stepper on the CPU runs op by op and gives the forward" do
      {m64, _} = model_pair(@small, :cpu)
      m32 = Model.new(@small ++ [seed: 5, device: :cpu])
      {_, x32} = rand_inputs(2, 6, 7, 4)
      {ref, _} = Model.forward(m32, x32)
      st = Stepper.new(m32, 2)
      assert Stepper.info(st).mode == :ops
      refute Model.fused?(m32)
      refute Model.fused?(m64)

      {outs, _} =
        Enum.map_reduce(0..5, st, fn t, st ->
          {y, st} = Stepper.step(st, x32 |> Tensor.slice(1, t, 1) |> Tensor.to_binary())
          {Tensor.from_binary(y, {:f, 32}, shape: {2, 1, 5}), st}
        end)

      assert_close(Tensor.concatenate(outs, 1), ref, "cpu stepper")
    end

    test "misuse raises ArgumentError" do
      m = Model.new(@small ++ [seed: 5, device: :cpu])
      assert_raise ArgumentError, ~r/batch/, fn -> Stepper.new(m, 0) end
      assert_raise ArgumentError, ~r/fused: true/, fn -> Stepper.new(m, 1, fused: true) end
      assert_raise ArgumentError, ~r/fused: true/, fn -> Model.step(m, Model.init_state(m, 1), Tensor.zeros({1, 7}), fused: true) end
      assert_raise ArgumentError, ~r/:fused must be/, fn -> Model.forward_with_state(m, Tensor.zeros({1, 2, 7}), fused: :maybe) end
      st = Stepper.new(m, 1)
      assert_raise ArgumentError, ~r/frames must be/, fn -> Stepper.step(st, <<1, 2, 3>>) end
      assert_raise ArgumentError, ~r/frames must be a binary/, fn -> Stepper.step(st, :nope) end
      assert_raise ArgumentError, ~r/:reset/, fn -> Stepper.step(st, :binary.copy(<<0::32>>, 7), reset: <<1, 1>>) end
      assert_raise ArgumentError, ~r/state/, fn -> Stepper.new(m, 2, state: Model.init_state(m, 1)) end
      assert_raise ArgumentError, ~r/on a CUDA device/, fn ->
        {cfg, top, layers} = Model.fused_args(m, 0)
        NIF.infer(cfg, top, layers, Tensor.zeros({1, 1, 7}), nil, nil, false)
      end
    end
  end
end
