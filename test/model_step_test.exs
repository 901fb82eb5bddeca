defmodule Mambex.ModelStepTest do
  # Recurrent inference: Model.init_state/2, step/4, forward_with_state/3 and
  # the :state / :reset options of forward/3, checked against the parallel
  # forward over whole sequences (itself checked against finite differences
  # and training in model_test.exs).
  use ExUnit.Case, async: false

  alias Mambex.{Model, Tensor}
  import Mambex.TestHelpers

  @tiny [features: 3, outputs: 4, d_model: 8, n_layers: 2, d_state: 4, d_conv: 4]

  defp tol({:f, 64}), do: 1.0e-12
  defp tol({:f, 32}), do: 1.0e-5

  defp model(device, type, seed \\ 3), do: Model.new(@tiny ++ [seed: seed, type: type, device: device])

  defp inputs(b, l, type, device) do
    {t, _} = rand_tensor({b, l, 3}, type, device, lo: 0.05, hi: 1.0)
    t
  end

  defp flags(values, shape, device), do: make(values, {:u, 8}, shape, device)

  # Steps through every frame of `x` {B, L, F}; `opts_at.(t)` gives the
  # options of step t. Returns {outputs {B, L, O}, final state}.
  defp run_steps(model, state, x, opts_at \\ fn _ -> [] end) do
    {b, l, f} = Tensor.shape(x)

    {outs, state} =
      Enum.map_reduce(0..(l - 1)//1, state, fn t, st ->
        frame = x |> Tensor.slice(1, t, 1) |> Tensor.reshape({b, f})
        {y, st} = Model.step(model, st, frame, opts_at.(t))
        assert Tensor.shape(y) == {b, 4}
        {Tensor.reshape(y, {b, 1, 4}), st}
      end)

    {Tensor.concatenate(outs, 1), state}
  end

  defp rows(t, r, n), do: Tensor.slice(t, 0, r, n)
  defp steps(t, s, n), do: Tensor.slice(t, 1, s, n)

  defp assert_close(out, ref, type, label) do
    err = rel_err(read(out), read(ref))
    assert is_number(err) and err <= tol(type), "#{label}: relative error #{inspect(err)} > #{tol(type)}"
  end

  defp check_steps_equal_forward(device, type, b, l) do
    m = model(device, type)
    x = inputs(b, l, type, device)
    {ref, _} = Model.forward(m, x)
    {out, _} = run_steps(m, Model.init_state(m, b), x)
    assert_close(out, ref, type, "#{inspect(type)} B=#{b} L=#{l}")
  end

  describe "cpu" do
    setup ctx, do: seed_rand(ctx)

    test "init_state: zeros of the model's type on its device, per layer" do
      m = model(:cpu, {:f, 32})
      s = Model.init_state(m, 5)
      assert %Model.State{batch: 5, layers: [{c0, h0}, {_c1, _h1}]} = s
      assert Tensor.shape(c0) == {5, 16, 3} and Tensor.shape(h0) == {5, 16, 4}
      assert Tensor.type(c0) == {:f, 32} and Tensor.device(h0) == :cpu
      assert Enum.all?(read(c0) ++ read(h0), &(&1 == 0.0))
      assert Model.init_state(m, 0).batch == 0
    end

    for type <- [{:f, 32}, {:f, 64}], b <- [1, 3], l <- [1, 7, 60] do
      @tag type: type, b: b, l: l
      test "stepping #{inspect(type)} B=#{b} L=#{l} gives the parallel forward", ctx do
        check_steps_equal_forward(:cpu, ctx.type, ctx.b, ctx.l)
      end
    end

    test "a {B, 1, features} frame gives {B, 1, outputs} logits" do
      m = model(:cpu, {:f, 64})
      x = inputs(2, 1, {:f, 64}, :cpu)
      {y, _} = Model.step(m, Model.init_state(m, 2), x)
      {ref, _} = Model.forward(m, x)
      assert Tensor.shape(y) == {2, 1, 4}
      assert_close(y, ref, {:f, 64}, "3-d frame")
    end

    for type <- [{:f, 32}, {:f, 64}] do
      @tag type: type
      test "a window then steps (or a second window) gives the forward over the whole #{inspect(type)}", ctx do
        type = ctx.type
        m = model(:cpu, type)
        x = inputs(2, 67, type, :cpu)
        {ref, _} = Model.forward(m, x)

        {w, state} = Model.forward_with_state(m, steps(x, 0, 60))
        {s, state2} = run_steps(m, state, steps(x, 60, 7))
        assert_close(Tensor.concatenate([w, s], 1), ref, type, "window + steps")

        {w2, state3} = Model.forward_with_state(m, steps(x, 60, 7), state: state)
        assert_close(w2, steps(ref, 60, 7), type, "window + window")

        # both ways end in the same state
        for {{c1, h1}, {c2, h2}} <- Enum.zip(state2.layers, state3.layers) do
          assert_close(c1, c2, type, "conv state")
          assert_close(h1, h2, type, "ssm state")
        end

        # the state a forward leaves in its context is the same one
        {_, ctx_f} = Model.forward(m, steps(x, 0, 60))
        assert Enum.map(ctx_f.final_state.layers, fn {c, h} -> {read(c), read(h)} end) ==
                 Enum.map(state.layers, fn {c, h} -> {read(c), read(h)} end)
      end
    end

    for type <- [{:f, 32}, {:f, 64}] do
      @tag type: type
      test "a per-row reset in step runs that row afresh, the others continue #{inspect(type)}", ctx do
        type = ctx.type
        m = model(:cpu, type)
        x1 = inputs(3, 5, type, :cpu)
        x2 = inputs(3, 6, type, :cpu)
        {_, state} = run_steps(m, Model.init_state(m, 3), x1)
        reset = flags([0, 1, 0], {3}, :cpu)
        {out, _} = run_steps(m, state, x2, fn t -> if t == 0, do: [reset: reset], else: [reset: nil] end)

        {cont, _} = Model.forward(m, Tensor.concatenate([x1, x2], 1))
        {fresh, _} = Model.forward(m, rows(x2, 1, 1))
        assert_close(rows(out, 0, 1), rows(steps(cont, 5, 6), 0, 1), type, "row 0")
        assert_close(rows(out, 2, 1), rows(steps(cont, 5, 6), 2, 1), type, "row 2")
        assert_close(rows(out, 1, 1), fresh, type, "row 1 (reset)")

        # all-zero reset changes nothing; resetting a zero state changes nothing
        {a, _} = Model.step(m, state, Tensor.reshape(steps(x2, 0, 1), {3, 3}), reset: flags([0, 0, 0], {3}, :cpu))
        {b, _} = Model.step(m, state, Tensor.reshape(steps(x2, 0, 1), {3, 3}))
        assert read(a) == read(b)
        {c, _} = Model.step(m, Model.init_state(m, 3), Tensor.reshape(steps(x2, 0, 1), {3, 3}), reset: flags([1, 7, 1], {3}, :cpu))
        {d, _} = Model.step(m, Model.init_state(m, 3), Tensor.reshape(steps(x2, 0, 1), {3, 3}))
        assert read(c) == read(d)
      end
    end

    for type <- [{:f, 32}, {:f, 64}] do
      @tag type: type
      test "resets inside a window reset the scan and the convolution #{inspect(type)}", ctx do
        type = ctx.type
        m = model(:cpu, type)
        x0 = inputs(2, 4, type, :cpu)
        x = inputs(2, 10, type, :cpu)
        {_, state} = Model.forward_with_state(m, x0)
        # row 0 resets at 4 (and at 5: a piece of one step); row 1 at 0 and at 8
        r = for row <- 0..1, t <- 0..9, do: if({row, t} in [{0, 4}, {0, 5}, {1, 0}, {1, 8}], do: 1, else: 0)
        reset = flags(r, {2, 10}, :cpu)
        {out, final} = Model.forward_with_state(m, x, state: state, reset: reset)

        # the same through steps with per-row resets
        {stepped, final_s} = run_steps(m, state, x, fn t -> [reset: Tensor.slice(reset, 1, t, 1) |> Tensor.reshape({2})] end)
        assert_close(out, stepped, type, "window vs steps")

        for {{c1, h1}, {c2, h2}} <- Enum.zip(final.layers, final_s.layers) do
          assert_close(c1, c2, type, "conv state")
          assert_close(h1, h2, type, "ssm state")
        end

        # after a reset, a row's outputs are those of a fresh sequence from there
        for {row, from, to} <- [{0, 5, 10}, {1, 0, 8}, {1, 8, 10}] do
          {fresh, _} = Model.forward(m, x |> rows(row, 1) |> steps(from, to - from))
          assert_close(out |> rows(row, 1) |> steps(from, to - from), fresh, type, "row #{row} from #{from}")
        end

        # row 0 before its first reset continues from the given state
        {cont, _} = Model.forward(m, Tensor.concatenate([x0, x], 1))
        assert_close(out |> rows(0, 1) |> steps(0, 4), cont |> rows(0, 1) |> steps(4, 4), type, "row 0 before reset")

        # a reset that is all zeros is no reset
        {plain, _} = Model.forward(m, x, state: state)
        {zero_r, _} = Model.forward(m, x, state: state, reset: flags(List.duplicate(0, 20), {2, 10}, :cpu))
        assert read(plain) == read(zero_r)
      end
    end

    test "backward through a window with resets: the sum of the pieces' gradients (f64)" do
      type = {:f, 64}
      m = model(:cpu, type)
      x = inputs(2, 8, type, :cpu)
      {d_out, _} = rand_tensor({2, 8, 4}, type, :cpu)
      r = for row <- 0..1, t <- 0..7, do: if({row, t} in [{0, 3}, {1, 5}, {1, 6}], do: 1, else: 0)
      {_, ctx} = Model.forward(m, x, reset: flags(r, {2, 8}, :cpu))
      whole = Model.backward(m, ctx, d_out)

      pieces = [{0, 0, 3}, {0, 3, 5}, {1, 0, 5}, {1, 5, 1}, {1, 6, 2}]

      sum =
        Enum.reduce(pieces, nil, fn {row, from, n}, acc ->
          {_, c} = Model.forward(m, x |> rows(row, 1) |> steps(from, n))
          g = Model.backward(m, c, d_out |> rows(row, 1) |> steps(from, n))
          if acc, do: Map.new(g, fn {k, v} -> {k, Mambex.Ops.add(acc[k], v)} end), else: g
        end)

      for {k, g} <- whole do
        err = rel_err(read(g), read(sum[k]))
        assert err <= 1.0e-10, "#{k}: relative error #{err}"
      end
    end

    test "backward from a given state, with into:, accumulates like two calls" do
      m = model(:cpu, {:f, 64})
      x = inputs(2, 5, {:f, 64}, :cpu)
      {_, state} = Model.forward_with_state(m, inputs(2, 3, {:f, 64}, :cpu))
      {d_out, _} = rand_tensor({2, 5, 4}, {:f, 64}, :cpu)
      reset = flags([0, 0, 1, 0, 0, 1, 0, 0, 0, 0], {2, 5}, :cpu)

      for opts <- [[state: state], [state: state, reset: reset]] do
        {_, ctx} = Model.forward(m, x, opts)
        g1 = Model.backward(m, ctx, d_out)
        into = Map.new(g1, fn {k, v} -> {k, Mambex.Ops.add(v, 0.0)} end)
        g2 = Model.backward(m, ctx, d_out, into: into)

        for {k, v} <- g1 do
          err = rel_err(read(g2[k]), Enum.map(read(v), &(2 * &1)))
          assert err <= 1.0e-12, "#{inspect(Keyword.keys(opts))} #{k}: #{err}"
        end
      end
    end

    test "stepping leaks no memory" do
      m = model(:cpu, {:f, 32})
      x = inputs(4, 1, {:f, 32}, :cpu) |> Tensor.reshape({4, 3})
      reset = flags([1, 0, 0, 1], {4}, :cpu)
      state = Model.init_state(m, 4)
      # let the temporaries of Model.new die first (their destructors run
      # once this process is scheduled out)
      :erlang.garbage_collect()
      Process.sleep(20)
      base = settled_stats(:cpu)

      # 200 steps in a task (nothing of them stays referenced once it ends)
      shapes =
        Task.async(fn ->
          {y, last} =
            Enum.reduce(1..200, {nil, state}, fn i, {_y, st} ->
              Model.step(m, st, x, reset: if(rem(i, 7) == 0, do: reset))
            end)

          {Tensor.shape(y), last.batch}
        end)
        |> Task.await()

      assert shapes == {{4, 4}, 4}
      after_ = settled_stats(:cpu, base)
      assert {after_.live_bytes, after_.live_handles} == {base.live_bytes, base.live_handles}
      # the model, inputs and first state stay alive (and counted) until here
      assert Enum.all?([x, reset | Map.values(m.params)] ++ Enum.flat_map(state.layers, &Tuple.to_list/1), &Tensor.live?/1)
    end

    test "misuse raises ArgumentError naming the argument" do
      m = model(:cpu, {:f, 32})
      s = Model.init_state(m, 2)
      frame = inputs(2, 1, {:f, 32}, :cpu) |> Tensor.reshape({2, 3})
      other = Model.new(Keyword.merge(@tiny, seed: 1, d_state: 5))

      raises = fn fun, word ->
        e = assert_raise ArgumentError, fun
        assert e.message =~ word, "expected #{inspect(word)} in: #{e.message}"
      end

      raises.(fn -> Model.step(m, s, :nope) end, "frame")
      raises.(fn -> Model.step(m, s, Tensor.zeros({2, 4})) end, "frame")
      raises.(fn -> Model.step(m, s, Tensor.zeros({2, 2, 3})) end, "frame")
      raises.(fn -> Model.step(m, s, Tensor.zeros({2, 3}, type: {:f, 64})) end, "frame")
      raises.(fn -> Model.step(m, s, Tensor.zeros({6})) end, "frame")
      raises.(fn -> Model.step(m, nil, frame) end, "state")
      raises.(fn -> Model.step(m, Model.init_state(m, 3), frame) end, "state")
      raises.(fn -> Model.step(m, Model.init_state(other, 2), frame) end, "state")
      raises.(fn -> Model.step(m, %{s | layers: tl(s.layers)}, frame) end, "state")
      raises.(fn -> Model.step(m, %{s | layers: [:x, :y]}, frame) end, "state")
      f64 = Model.init_state(model(:cpu, {:f, 64}), 2)
      raises.(fn -> Model.step(m, f64, frame) end, "state")
      raises.(fn -> Model.step(m, s, frame, reset: flags([1, 0, 0], {3}, :cpu)) end, "reset")
      raises.(fn -> Model.step(m, s, frame, reset: Tensor.zeros({2})) end, "reset")
      raises.(fn -> Model.step(m, s, frame, reset: [1, 0]) end, "reset")
      raises.(fn -> Model.step(m, s, frame, bogus: 1) end, "bogus")
      raises.(fn -> Model.step(m, s, frame, :nope) end, "options")
      raises.(fn -> Model.init_state(m, -1) end, "batch")
      x = inputs(2, 5, {:f, 32}, :cpu)
      raises.(fn -> Model.forward(m, x, state: Model.init_state(m, 1)) end, "state")
      raises.(fn -> Model.forward(m, x, reset: flags([1, 0], {2}, :cpu)) end, "reset")
      raises.(fn -> Model.forward(m, Tensor.zeros({2, 5, 7})) end, "inputs")
      raises.(fn -> Model.forward_with_state(m, x, nope: 1) end, "nope")
    end
  end

  describe "cuda" do
    setup ctx, do: seed_rand(ctx)

    @tag :cuda
    test "stepping gives the parallel forward; window then steps; per-row reset" do
      device = cuda_device()
      for b <- [1, 3], l <- [1, 7, 60], do: check_steps_equal_forward(device, {:f, 32}, b, l)

      m = model(device, {:f, 32})
      x = inputs(2, 67, {:f, 32}, device)
      {ref, _} = Model.forward(m, x)
      {w, state} = Model.forward_with_state(m, steps(x, 0, 60))
      {s, _} = run_steps(m, state, steps(x, 60, 7))
      assert_close(Tensor.concatenate([w, s], 1), ref, {:f, 32}, "window + steps")

      reset = flags([0, 1], {2}, device)
      {out, _} = run_steps(m, state, steps(x, 60, 7), fn t -> if t == 0, do: [reset: reset], else: [] end)
      {fresh, _} = Model.forward(m, x |> rows(1, 1) |> steps(60, 7))
      assert_close(rows(out, 0, 1), ref |> rows(0, 1) |> steps(60, 7), {:f, 32}, "row 0")
      assert_close(rows(out, 1, 1), fresh, {:f, 32}, "row 1 (reset)")

      r = for row <- 0..1, t <- 0..6, do: if({row, t} in [{0, 2}, {1, 5}], do: 1, else: 0)
      wreset = flags(r, {2, 7}, device)
      {wout, _} = Model.forward_with_state(m, steps(x, 60, 7), state: state, reset: wreset)
      {sout, _} = run_steps(m, state, steps(x, 60, 7), fn t -> [reset: Tensor.slice(wreset, 1, t, 1) |> Tensor.reshape({2})] end)
      assert_close(wout, sout, {:f, 32}, "window resets vs step resets")

      if device != :cpu do
        frame = Tensor.zeros({2, 3})
        assert_raise ArgumentError, ~r/frame/, fn -> Model.step(m, Model.init_state(m, 2), frame) end
        cpu_state = Model.init_state(model(:cpu, {:f, 32}), 2)
        assert_raise ArgumentError, ~r/state/, fn -> Model.step(m, cpu_state, Tensor.to_device(frame, device)) end
      end
    end
  end
end
