Code.require_file("support/activation_reference.exs", __DIR__)

defmodule Mambex.ActivationTest do
  # Pointwise activations and SwiGLU (Mambex.Activation) against the float64
  # reference (test/support/activation_reference.exs), finite differences,
  # determinism, memory and misuse. Inputs derive from the run's seed and the
  # test's name.
  use ExUnit.Case, async: true

  import Mambex.TestHelpers

  alias Mambex.{Activation, Tensor}
  alias Mambex.ActivationReference, as: Ref

  setup ctx do
    seed_rand(ctx)
    :ok
  end

  @acts [:silu, :gelu, :softplus, :sigmoid]

  defp tol({:f, 32}), do: 1.0e-5
  defp tol({:f, 64}), do: 1.0e-12
  defp tol({:bf, 16}), do: 1.0e-2

  defp fwd(act, x), do: apply(Activation, act, [x])
  defp bwd(act, x, dy), do: apply(Activation, :"#{act}_backward", [x, dy])

  defp check(out, ref, tol, what) do
    assert length(out) == length(ref)
    err = rel_err(out, ref)

    assert is_number(err) and err <= tol,
           "#{what}: relative error #{inspect(err)} > #{tol} (seed #{base_seed()})\n" <>
             "out: #{inspect(Enum.take(out, 6))}\nref: #{inspect(Enum.take(ref, 6))}"
  end

  # Values over the interesting range, with a few far out (softplus above
  # 20, sigmoid far below 0), never zero.
  defp inputs(n, type) do
    wide = [25.0, -30.0, 21.5, -21.5, 19.5, 8.0, -8.0]
    base = rand_values(n, type, lo: 0.01, hi: 6.0)

    Enum.with_index(base, fn v, i ->
      if rem(i, 13) == 5, do: quantize(Enum.at(wide, rem(i, 7)), type), else: v
    end)
  end

  defp check_acts(device, shape, type) do
    n = numel(shape)
    xs = inputs(n, type)
    dys = rand_values(n, type, lo: 0.1, hi: 2.0)
    x = make(xs, type, shape, device)
    dy = make(dys, type, shape, device)

    for act <- @acts do
      y = fwd(act, x)
      assert y.shape == shape and y.type == type and y.device == device

      check(
        read(y),
        Enum.map(xs, &Ref.act(act, &1)),
        tol(type),
        "#{act} #{inspect(shape)} #{inspect(type)}"
      )

      dx = bwd(act, x, dy)
      ref = Enum.zip_with(xs, dys, fn v, g -> g * Ref.dact(act, v) end)
      check(read(dx), ref, tol(type), "#{act}_backward #{inspect(shape)} #{inspect(type)}")
    end

    bs = rand_values(n, type, lo: 0.1, hi: 3.0)
    b = make(bs, type, shape, device)
    check(read(Activation.swiglu(x, b)), Ref.swiglu(xs, bs), tol(type), "swiglu #{inspect(type)}")
    {da, db} = Activation.swiglu_backward(x, b, dy)
    {rda, rdb} = Ref.swiglu_backward(xs, bs, dys)
    check(read(da), rda, tol(type), "swiglu da #{inspect(type)}")
    check(read(db), rdb, tol(type), "swiglu db #{inspect(type)}")
  end

  @shapes [{1}, {7}, {3, 5, 11}, {2, 257}, {301, 257}]

  for type <- [{:f, 32}, {:f, 64}], shape <- @shapes do
    test "#{inspect(type)} on the CPU against the float64 reference, shape #{inspect(shape)}" do
      check_acts(:cpu, unquote(Macro.escape(shape)), unquote(type))
    end
  end

  defp empty(device) do
    x = Tensor.zeros({0, 5}, device: device)

    for act <- @acts do
      assert fwd(act, x).shape == {0, 5}
      assert bwd(act, x, x).shape == {0, 5}
    end

    assert Activation.swiglu(x, x).shape == {0, 5}
    {da, db} = Activation.swiglu_backward(x, x, x)
    assert da.shape == {0, 5} and db.shape == {0, 5}
  end

  test "empty tensors give empty outputs" do
    empty(:cpu)
  end

  test "finite differences check every gradient (reference and f64 CPU)" do
    xs = inputs(26, {:f, 64})
    h = 1.0e-6

    for act <- @acts do
      numeric = Enum.map(xs, fn v -> (Ref.act(act, v + h) - Ref.act(act, v - h)) / (2 * h) end)
      check(Enum.map(xs, &Ref.dact(act, &1)), numeric, 1.0e-7, "reference #{act}'")

      t = fn vals -> make(vals, {:f, 64}, {length(vals)}, :cpu) end
      lib = fn vals -> read(fwd(act, t.(vals))) end

      lib_numeric =
        Enum.zip_with(
          lib.(Enum.map(xs, &(&1 + h))),
          lib.(Enum.map(xs, &(&1 - h))),
          &((&1 - &2) / (2 * h))
        )

      ones = List.duplicate(1.0, length(xs))
      check(read(bwd(act, t.(xs), t.(ones))), lib_numeric, 1.0e-7, "f64 #{act}_backward")
    end

    # swiglu: loss = sum(out * g)
    bs = rand_values(26, {:f, 64}, lo: 0.1, hi: 3.0)
    gs = rand_values(26, {:f, 64}, lo: 0.1, hi: 2.0)
    t = fn vals -> make(vals, {:f, 64}, {26}, :cpu) end
    out = fn a, b -> Enum.zip_with(read(Activation.swiglu(t.(a), t.(b))), gs, &(&1 * &2)) end
    {da, db} = Activation.swiglu_backward(t.(xs), t.(bs), t.(gs))

    nda =
      Enum.zip_with([out.(Enum.map(xs, &(&1 + h)), bs), out.(Enum.map(xs, &(&1 - h)), bs)], fn [
                                                                                                 p,
                                                                                                 m
                                                                                               ] ->
        (p - m) / (2 * h)
      end)

    ndb =
      Enum.zip_with([out.(xs, Enum.map(bs, &(&1 + h))), out.(xs, Enum.map(bs, &(&1 - h)))], fn [
                                                                                                 p,
                                                                                                 m
                                                                                               ] ->
        (p - m) / (2 * h)
      end)

    check(read(da), nda, 1.0e-7, "f64 swiglu da")
    check(read(db), ndb, 1.0e-7, "f64 swiglu db")
    {rda, rdb} = Ref.swiglu_backward(xs, bs, gs)
    check(rda, nda, 1.0e-7, "reference swiglu da")
    check(rdb, ndb, 1.0e-7, "reference swiglu db")
  end

  defp determinism(device) do
    shape = {512, 300}
    x = make(inputs(512 * 300, {:f, 32}), {:f, 32}, shape, device)
    b = make(rand_values(512 * 300, {:f, 32}), {:f, 32}, shape, device)

    run = fn ->
      outs = for act <- @acts, do: [fwd(act, x), bwd(act, x, b)]
      {da, db} = Activation.swiglu_backward(x, b, x)

      (outs ++ [Activation.swiglu(x, b), da, db])
      |> List.flatten()
      |> Enum.map(&Tensor.to_binary/1)
    end

    first = run.()
    assert run.() == first

    concurrent =
      1..3 |> Enum.map(fn _ -> Task.async(run) end) |> Enum.map(&Task.await(&1, 60_000))

    assert Enum.all?(concurrent, &(&1 == first))
  end

  test "bit-identical reruns, also concurrent (thread pool)" do
    determinism(:cpu)
  end

  defp raises_naming(fun, name) do
    e = assert_raise ArgumentError, fun
    assert e.message =~ name, "expected the message to name #{inspect(name)}: #{e.message}"
  end

  test "misuse raises ArgumentError naming the op and the argument" do
    x = make(inputs(12, {:f, 32}), {:f, 32}, {3, 4}, :cpu)
    x64 = make(inputs(12, {:f, 64}), {:f, 64}, {3, 4}, :cpu)
    other = make(inputs(12, {:f, 32}), {:f, 32}, {4, 3}, :cpu)
    ints = Tensor.zeros({3, 4}, type: {:s, 32})
    half = Tensor.zeros({3, 4}, type: {:f, 16})
    dead = make(inputs(12, {:f, 32}), {:f, 32}, {3, 4}, :cpu)
    Tensor.free(dead)

    for act <- @acts do
      raises_naming(fn -> fwd(act, :junk) end, "#{act}: x")
      raises_naming(fn -> fwd(act, ints) end, "#{act}: x")
      raises_naming(fn -> fwd(act, half) end, "#{act}: x")
      raises_naming(fn -> fwd(act, dead) end, "#{act}: x was freed")
      raises_naming(fn -> bwd(act, x, other) end, "#{act}_backward: dy")
      raises_naming(fn -> bwd(act, x, x64) end, "#{act}_backward: dy")
      raises_naming(fn -> bwd(act, x, nil) end, "#{act}_backward: dy")
      raises_naming(fn -> bwd(act, dead, x) end, "#{act}_backward: x")
    end

    raises_naming(fn -> Activation.swiglu(x, other) end, "swiglu: b")
    raises_naming(fn -> Activation.swiglu(x, x64) end, "swiglu: b")
    raises_naming(fn -> Activation.swiglu(1.0, x) end, "swiglu: a")
    raises_naming(fn -> Activation.swiglu(x, dead) end, "swiglu: b was freed")
    raises_naming(fn -> Activation.swiglu_backward(x, x, other) end, "swiglu_backward: dout")
    raises_naming(fn -> Activation.swiglu_backward(ints, ints, ints) end, "swiglu_backward: a")
    raises_naming(fn -> Activation.swiglu_backward(x, x64, x) end, "swiglu_backward: b")

    for f <- [:act_forward, :act_backward], bad <- [:relu, 1, "silu"] do
      args = if f == :act_forward, do: [bad, x], else: [bad, x, x]
      raises_naming(fn -> apply(Mambex.NIF, f, args) end, "activation")
    end
  end

  # ---- CUDA ------------------------------------------------------------------------

  describe "CUDA" do
    @describetag :cuda

    test "f32 against the float64 reference (vector path and odd tails)" do
      for shape <- [{1}, {3}, {7}, {3, 5, 11}, {301, 257}, {4096}],
          do: check_acts(cuda_device(), shape, {:f, 32})
    end

    test "bf16 against the float64 reference (1e-2)" do
      for shape <- [{5}, {3, 5, 11}, {301, 257}],
          cuda_device() != :cpu,
          do: check_acts(cuda_device(), shape, {:bf, 16})
    end

    test "CPU and CUDA agree (f32)" do
      n = 10_007
      xs = inputs(n, {:f, 32})
      dys = rand_values(n, {:f, 32})

      run = fn dev ->
        x = make(xs, {:f, 32}, {n}, dev)
        dy = make(dys, {:f, 32}, {n}, dev)
        outs = for act <- @acts, do: [fwd(act, x), bwd(act, x, dy)]
        {da, db} = Activation.swiglu_backward(x, dy, x)
        (outs ++ [Activation.swiglu(x, dy), da, db]) |> List.flatten() |> Enum.map(&read/1)
      end

      Enum.zip_with(run.(:cpu), run.(cuda_device()), fn c, g ->
        check(g, c, 1.0e-6, "CPU vs CUDA")
      end)
    end

    test "bit-identical reruns" do
      determinism(cuda_device())
    end

    test "empty tensors" do
      empty(cuda_device())
    end

    test "f64 refused and mixed devices raise naming the argument" do
      dev = cuda_device()

      if dev != :cpu do
        raises_naming(
          fn -> Activation.silu(Tensor.zeros({4}, type: {:f, 64}, device: dev)) end,
          "x"
        )

        raises_naming(
          fn -> Activation.swiglu(Tensor.zeros({4}, device: dev), Tensor.zeros({4})) end,
          "b"
        )
      end
    end
  end
end

defmodule Mambex.ActivationLeakTest do
  # Memory statistics are per device and global: `async: false`.
  use ExUnit.Case, async: false

  import Mambex.TestHelpers

  alias Mambex.{Activation, Tensor}

  defp leak_check(device) do
    x = make(rand_values(600, {:f, 32}), {:f, 32}, {20, 30}, device)
    base = settled_stats(device)

    for _ <- 1..200 do
      for act <- [:silu, :gelu, :softplus, :sigmoid] do
        y = apply(Activation, act, [x])
        apply(Activation, :"#{act}_backward", [x, y])
      end

      Activation.swiglu_backward(x, x, Activation.swiglu(x, x))

      assert_raise ArgumentError, fn ->
        Activation.swiglu(x, Tensor.zeros({3}, device: device))
      end
    end

    after_ = settled_stats(device, base)
    assert after_.live_bytes == base.live_bytes and after_.live_handles == base.live_handles
    assert Tensor.live?(x)
  end

  test "live bytes and handles return to their start after many calls" do
    leak_check(:cpu)
  end

  @tag :cuda
  test "on CUDA too" do
    leak_check(cuda_device())
  end
end
