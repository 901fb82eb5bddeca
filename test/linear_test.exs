Code.require_file("support/linear_reference.exs", __DIR__)

defmodule Mambex.LinearTest do
  use ExUnit.Case, async: true

  import Mambex.TestHelpers,
    only: [rand_tensor: 3, read: 1, rel_err: 2, seed_rand: 1, make: 4, numel: 1]

  alias Mambex.LinearReference, as: Ref
  alias Mambex.{Linear, Tensor}

  @moduletag timeout: 300_000

  setup context do
    seed_rand(context)
    {:ok, note: "(ExUnit seed #{ExUnit.configuration()[:seed]}, test #{context.test})"}
  end

  # {x shape, out_features, bias?}: 1x1x1, odd sizes, K = 1, one row, x of
  # rank 1 and 4, K past one k block (256), rows past one block for dW.
  @cases [
    {{1, 1}, 1, true},
    {{7, 13}, 5, true},
    {{100, 37}, 65, false},
    {{100, 37}, 65, true},
    {{9, 1}, 17, true},
    {{1, 40}, 33, true},
    {{40}, 7, true},
    {{2, 3, 5, 11}, 6, true},
    {{20, 300}, 30, true},
    {{300, 7}, 5, true},
    # few rows (the CPU's strip path): K past one k block, N not a multiple of 16
    {{3, 600}, 37, true},
    {{1, 4, 257}, 48, false}
  ]

  defp bits(%Tensor{} = t), do: Tensor.to_binary(t)

  defp dims(x_shape, n) do
    list = Tuple.to_list(x_shape)
    k = List.last(list)
    rows = list |> Enum.drop(-1) |> Enum.reduce(1, &*/2)
    {rows, k, n}
  end

  defp y_shape(x_shape, n), do: put_elem(x_shape, tuple_size(x_shape) - 1, n)

  # Random inputs of a case: tensors on `device` and their values.
  defp case_inputs(x_shape, n, type, device) do
    {rows, k, _} = dims(x_shape, n)
    {x, xv} = rand_tensor(x_shape, type, device)
    {w, wv} = rand_tensor({k, n}, type, device)
    {b, bv} = rand_tensor({n}, type, device)
    {dy, dyv} = rand_tensor(y_shape(x_shape, n), type, device)
    %{x: x, w: w, b: b, dy: dy, xv: xv, wv: wv, bv: bv, dyv: dyv, rows: rows, k: k, n: n}
  end

  defp assert_close(out, ref, tol, label) do
    e = rel_err(out, ref)
    assert is_number(e) and e <= tol, "#{label}: relative error #{inspect(e)} > #{tol}"
  end

  # ||out - ref|| / ||mag||, mag the same computation on absolute values.
  defp assert_close_to_terms(out, ref, mag, tol, label) do
    assert Enum.all?(out, &is_number/1), "#{label}: non-numbers in the output"
    num = Enum.zip_with(out, ref, fn o, r -> (o - r) * (o - r) end) |> Enum.sum() |> :math.sqrt()
    den = mag |> Enum.map(&(&1 * &1)) |> Enum.sum() |> :math.sqrt()
    e = if den > 0, do: num / den, else: num
    assert e <= tol, "#{label}: error #{e} of the terms' size > #{tol}"
  end

  # Forward and every gradient of one case against the f64 reference.
  def check_case(x_shape, n, bias?, type, device, fwd_tol, grad_tol, opts \\ []) do
    in_ = case_inputs(x_shape, n, type, device)
    %{rows: rows, k: k} = in_
    label = "#{inspect(x_shape)} x {#{k}, #{n}} #{inspect(type)} on #{inspect(device)}"
    fwd_opts = if bias?, do: [bias: in_.b], else: []
    y = Linear.forward(in_.x, in_.w, fwd_opts ++ opts)
    assert y.shape == y_shape(x_shape, n)
    assert y.type == type
    ref = Ref.forward(in_.xv, rows, k, in_.wv, n, if(bias?, do: in_.bv))
    assert_close(read(y), ref, fwd_tol, "forward #{label}")

    g = Linear.backward(in_.x, in_.w, in_.dy, [bias: bias?] ++ opts)
    rg = Ref.backward(in_.xv, rows, k, in_.wv, n, in_.dyv)
    assert Enum.sort(Map.keys(g)) == if(bias?, do: [:bias, :w, :x], else: [:w, :x])
    assert g.x.shape == x_shape and g.w.shape == {k, n}
    assert_close(read(g.x), rg.x, grad_tol, "dx #{label}")
    assert_close(read(g.w), rg.w, grad_tol, "dw #{label}")
    if bias?, do: assert_close(read(g.bias), rg.bias, grad_tol, "db #{label}")
    in_
  end

  describe "CPU against the float64 reference" do
    for {x_shape, n, bias?} <- @cases do
      test "f32 #{inspect(x_shape)} -> #{n} bias: #{bias?}" do
        check_case(
          unquote(Macro.escape(x_shape)),
          unquote(n),
          unquote(bias?),
          {:f, 32},
          :cpu,
          1.0e-5,
          1.0e-4
        )
      end
    end

    for {x_shape, n, bias?} <- Enum.take(@cases, 4) ++ [List.last(@cases)] do
      test "f64 #{inspect(x_shape)} -> #{n} bias: #{bias?}" do
        check_case(
          unquote(Macro.escape(x_shape)),
          unquote(n),
          unquote(bias?),
          {:f, 64},
          :cpu,
          1.0e-13,
          1.0e-13
        )
      end
    end

    test "precision: :tf32 is accepted and ignored on the CPU" do
      in_ = case_inputs({30, 20}, 10, {:f, 32}, :cpu)
      a = Linear.forward(in_.x, in_.w, bias: in_.b)
      b = Linear.forward(in_.x, in_.w, bias: in_.b, precision: :tf32)
      assert bits(a) == bits(b)
    end
  end

  # ---- finite differences (f64) ------------------------------------------------

  test "finite differences check the reference and the f64 CPU backward", %{note: note} do
    {x_shape, n} = {{2, 3, 4}, 3}
    in_ = case_inputs(x_shape, n, {:f, 64}, :cpu)
    %{rows: rows, k: k} = in_
    # loss = Σ y ⊙ dy: its gradient is the backward's for dy
    loss = fn xv, wv, bv ->
      x = make(xv, {:f, 64}, x_shape, :cpu)
      w = make(wv, {:f, 64}, {k, n}, :cpu)
      b = make(bv, {:f, 64}, {n}, :cpu)
      y = read(Linear.forward(x, w, bias: b))
      Enum.zip_reduce(y, in_.dyv, 0.0, fn a, c, s -> s + a * c end)
    end

    eps = 1.0e-6

    fd = fn list, f ->
      for i <- 0..(length(list) - 1) do
        v = Enum.at(list, i)

        (f.(List.replace_at(list, i, v + eps)) - f.(List.replace_at(list, i, v - eps))) /
          (2 * eps)
      end
    end

    want = %{
      x: fd.(in_.xv, &loss.(&1, in_.wv, in_.bv)),
      w: fd.(in_.wv, &loss.(in_.xv, &1, in_.bv)),
      bias: fd.(in_.bv, &loss.(in_.xv, in_.wv, &1))
    }

    got = Linear.backward(in_.x, in_.w, in_.dy, bias: true)
    ref = Ref.backward(in_.xv, rows, k, in_.wv, n, in_.dyv)

    for key <- [:x, :w, :bias] do
      assert_close(ref[key], want[key], 1.0e-7, "reference #{key} vs finite differences #{note}")
      assert_close(read(got[key]), want[key], 1.0e-7, "CPU #{key} vs finite differences #{note}")
    end
  end

  # ---- matmul: transposes, alpha, beta ---------------------------------------------

  defp nan_tensor(shape, device) do
    bin = :binary.copy(<<0x7FC00000::32-native>>, numel(shape))
    Tensor.from_binary(bin, {:f, 32}, shape: shape, device: device)
  end

  def check_matmul(device, type, tol, precision \\ :fp32) do
    for {m, k, n} <- [
          {1, 1, 1},
          {7, 5, 13},
          {33, 70, 9},
          {17, 300, 20},
          {2, 300, 37},
          {4, 513, 16},
          {3, 9, 1}
        ],
        ta <- [false, true],
        tb <- [false, true] do
      a_shape = if ta, do: {k, m}, else: {m, k}
      b_shape = if tb, do: {n, k}, else: {k, n}
      {a, av} = rand_tensor(a_shape, type, device)
      {b, bv} = rand_tensor(b_shape, type, device)
      label = "matmul #{m}x#{k}x#{n} ta: #{ta} tb: #{tb} #{inspect(type)}"
      mo = [transpose_a: ta, transpose_b: tb, precision: precision]

      # Errors are judged against the size of the terms (the same product
      # of |a|, |b|, |c|): a sum of few terms can cancel to almost nothing
      # (at 1x1x1, 2ab + 0.75c did, seed 703213).
      abs_a = Enum.map(av, &abs/1)
      abs_b = Enum.map(bv, &abs/1)
      c = Linear.matmul(a, b, mo ++ [alpha: -0.5])
      assert c.shape == {m, n}
      want = Ref.gemm(av, a_shape, ta, bv, b_shape, tb, -0.5, 0.0, nil)
      mag = Ref.gemm(abs_a, a_shape, ta, abs_b, b_shape, tb, 0.5, 0.0, nil)
      assert_close_to_terms(read(c), want, mag, tol, label <> " alpha -0.5")

      {c0, cv} = rand_tensor({m, n}, type, device)
      got = Linear.matmul(a, b, mo ++ [alpha: 2, into: c0, beta: 0.75])
      assert got.ref == c0.ref
      want = Ref.gemm(av, a_shape, ta, bv, b_shape, tb, 2.0, 0.75, cv)
      mag = Ref.gemm(abs_a, a_shape, ta, abs_b, b_shape, tb, 2.0, 0.75, Enum.map(cv, &abs/1))
      assert_close_to_terms(read(c0), want, mag, tol, label <> " alpha 2 beta 0.75 into")

      # beta = 0: the into tensor is not read (NaN stays out)
      if type == {:f, 32} do
        poisoned = nan_tensor({m, n}, device)
        Linear.matmul(a, b, mo ++ [into: poisoned, beta: 0])
        want = Ref.gemm(av, a_shape, ta, bv, b_shape, tb, 1.0, 0.0, nil)
        mag = Ref.gemm(abs_a, a_shape, ta, abs_b, b_shape, tb, 1.0, 0.0, nil)
        assert_close_to_terms(read(poisoned), want, mag, tol, label <> " beta 0 over NaN")
      end
    end
  end

  test "matmul: transposes, alpha, beta and into (f32, f64)" do
    check_matmul(:cpu, {:f, 32}, 1.0e-5)
    check_matmul(:cpu, {:f, 64}, 1.0e-13)
  end

  # ---- accumulation ---------------------------------------------------------------

  def check_into(device, type, tol) do
    {x_shape, n} = {{3, 50, 24}, 40}
    in1 = case_inputs(x_shape, n, type, device)
    {x2, _} = rand_tensor(x_shape, type, device)
    {dy2, _} = rand_tensor(y_shape(x_shape, n), type, device)
    g1 = Linear.backward(in1.x, in1.w, in1.dy, bias: true)
    g2 = Linear.backward(x2, in1.w, dy2, bias: true)
    acc_w = Tensor.from_binary(bits(g1.w), type, shape: g1.w.shape, device: device)
    acc_b = Tensor.from_binary(bits(g1.bias), type, shape: g1.bias.shape, device: device)
    g = Linear.backward(x2, in1.w, dy2, bias: true, into: %{w: acc_w, bias: acc_b})
    assert g.w.ref == acc_w.ref and g.bias.ref == acc_b.ref
    assert bits(g.x) == bits(g2.x)

    for {key, acc} <- [w: acc_w, bias: acc_b] do
      want = Enum.zip_with(read(g1[key]), read(g2[key]), &(&1 + &2))
      assert_close(read(acc), want, tol, "into #{key} on #{inspect(device)}")
    end

    # dx added into a tensor of x's shape: alone, and with the parameters
    acc_x = Tensor.from_binary(bits(g1.x), type, shape: g1.x.shape, device: device)
    gx = Linear.backward(x2, in1.w, dy2, into: %{x: acc_x})
    assert gx.x.ref == acc_x.ref
    assert bits(gx.w) == bits(g2.w)
    want_x = Enum.zip_with(read(g1.x), read(g2.x), &(&1 + &2))
    assert_close(read(acc_x), want_x, tol, "into x on #{inspect(device)}")

    acc_x = Tensor.from_binary(bits(g1.x), type, shape: g1.x.shape, device: device)
    acc_w = Tensor.from_binary(bits(g1.w), type, shape: g1.w.shape, device: device)
    gxw = Linear.backward(x2, in1.w, dy2, into: %{x: acc_x, w: acc_w})
    assert gxw.x.ref == acc_x.ref and gxw.w.ref == acc_w.ref
    assert_close(read(acc_x), want_x, tol, "into x and w on #{inspect(device)}")

    assert_close(
      read(acc_w),
      Enum.zip_with(read(g1.w), read(g2.w), &(&1 + &2)),
      tol,
      "into w with x"
    )
  end

  test "into: accumulates dw and db in place, equal to the sum of two calls" do
    check_into(:cpu, {:f, 32}, 1.0e-6)
    check_into(:cpu, {:f, 64}, 1.0e-15)
  end

  test "input_grad: false skips dx; into without bias" do
    in_ = case_inputs({6, 5}, 4, {:f, 32}, :cpu)
    g = Linear.backward(in_.x, in_.w, in_.dy, input_grad: false)
    assert Map.keys(g) == [:w]
    acc = Tensor.zeros({5, 4})
    g2 = Linear.backward(in_.x, in_.w, in_.dy, into: %{w: acc}, input_grad: false)
    assert Map.keys(g2) == [:w]
    # 0 + dw rounds to dw exactly
    assert bits(acc) == bits(g.w)
  end

  # ---- determinism ----------------------------------------------------------------

  defp all_bits(in_) do
    y = Linear.forward(in_.x, in_.w, bias: in_.b)
    g = Linear.backward(in_.x, in_.w, in_.dy, bias: true)
    [bits(y), bits(g.x), bits(g.w), bits(g.bias)]
  end

  test "bit-identical from run to run, and under concurrent calls (pool busy: serial)" do
    # 600 x 96 x 80: the forward and both gradient GEMMs run on the pool
    in_ = case_inputs({2, 300, 96}, 80, {:f, 32}, :cpu)
    first = all_bits(in_)
    for _ <- 1..3, do: assert(all_bits(in_) == first)

    results =
      1..6
      |> Task.async_stream(fn _ -> all_bits(in_) end, max_concurrency: 6, timeout: 120_000)
      |> Enum.map(fn {:ok, r} -> r end)

    assert Enum.all?(results, &(&1 == first))
  end

  # ---- empty sizes ----------------------------------------------------------------

  test "rows = 0, K = 0 and N = 0" do
    # rows = 0
    x = Tensor.zeros({0, 5})
    w = Tensor.ones({5, 3})
    b = make([1.0, 2.0, 3.0], {:f, 32}, {3}, :cpu)
    assert Linear.forward(x, w, bias: b).shape == {0, 3}
    g = Linear.backward(x, w, Tensor.zeros({0, 3}), bias: true)
    assert g.x.shape == {0, 5}
    assert read(g.w) == List.duplicate(0.0, 15)
    assert read(g.bias) == [0.0, 0.0, 0.0]
    acc_w = Tensor.fill({5, 3}, 2.0)
    acc_b = Tensor.fill({3}, 3.0)
    Linear.backward(x, w, Tensor.zeros({0, 3}), bias: true, into: %{w: acc_w, bias: acc_b})
    assert read(acc_w) == List.duplicate(2.0, 15)
    assert read(acc_b) == List.duplicate(3.0, 3)

    # K = 0: y = bias
    x = Tensor.zeros({2, 0})
    w = Tensor.zeros({0, 3})
    assert read(Linear.forward(x, w, bias: b)) == [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]
    assert read(Linear.forward(x, w)) == List.duplicate(0.0, 6)
    g = Linear.backward(x, w, Tensor.ones({2, 3}), bias: true)
    assert g.w.shape == {0, 3} and g.x.shape == {2, 0}
    assert read(g.bias) == [2.0, 2.0, 2.0]

    # N = 0: dx = 0
    x = Tensor.ones({4, 5})
    w = Tensor.zeros({5, 0})
    assert Linear.forward(x, w).shape == {4, 0}
    g = Linear.backward(x, w, Tensor.zeros({4, 0}), bias: true)
    assert read(g.x) == List.duplicate(0.0, 20)
    assert g.bias.shape == {0}

    # matmul with k = 0 and beta: c = beta c
    c = Tensor.fill({2, 2}, 4.0)
    Linear.matmul(Tensor.zeros({2, 0}), Tensor.zeros({0, 2}), into: c, beta: 0.5)
    assert read(c) == [2.0, 2.0, 2.0, 2.0]
  end

  # ---- misuse ----------------------------------------------------------------------

  defp valid do
    x = Tensor.random_uniform({2, 3, 4}, seed: 1)
    w = Tensor.random_uniform({4, 5}, seed: 2)
    b = Tensor.random_uniform({5}, seed: 3)
    dy = Tensor.random_uniform({2, 3, 5}, seed: 4)
    %{x: x, w: w, b: b, dy: dy}
  end

  test "wrong shapes, types, options raise ArgumentError naming the argument" do
    v = valid()
    f32 = fn shape -> Tensor.random_uniform(shape, seed: 9) end
    f64 = fn shape -> Tensor.random_uniform(shape, seed: 9, type: {:f, 64}) end
    s32 = Tensor.zeros({2, 3, 4}, type: {:s, 32})

    fwd = [
      {fn -> Linear.forward(Tensor.zeros({}), v.w) end,
       ~r/linear_forward: x must have rank >= 1/},
      {fn -> Linear.forward(v.x, f32.({5, 5})) end, ~r/w must have shape \{4, out_features\}/},
      {fn -> Linear.forward(v.x, f32.({4})) end, ~r/w must have shape/},
      {fn -> Linear.forward(v.x, f32.({4, 5, 1})) end, ~r/w must have shape/},
      {fn -> Linear.forward(v.x, v.w, bias: f32.({4})) end, ~r/bias must have shape \{5\}/},
      {fn -> Linear.forward(v.x, v.w, bias: f32.({1, 5})) end, ~r/bias must have shape/},
      {fn -> Linear.forward(v.x, f64.({4, 5})) end, ~r/w must have the type of x/},
      {fn -> Linear.forward(v.x, v.w, bias: f64.({5})) end, ~r/bias must have the type of x/},
      {fn -> Linear.forward(s32, v.w) end,
       ~r/x must have type \{:f, 32\} or \{:f, 64\} on the CPU/},
      {fn -> Linear.forward(v.x, v.w, precision: :fp16) end,
       ~r/precision must be :fp32 or :tf32/},
      {fn -> Linear.forward(v.x, v.w, bias: :yes) end, ~r/bias must be a Mambex.Tensor or nil/},
      {fn -> Linear.forward(v.x, v.w, gate: 1) end, ~r/linear_forward: unknown keys/},
      {fn -> Linear.forward(v.x, v.w, :oops) end, ~r/options must be a keyword list/}
    ]

    bwd = [
      {fn -> Linear.backward(v.x, v.w, f32.({2, 3, 4})) end,
       ~r/linear_backward: dy must have shape \{2,3,5\}/},
      {fn -> Linear.backward(v.x, v.w, f32.({6, 5})) end, ~r/dy must have shape/},
      {fn -> Linear.backward(v.x, v.w, f64.({2, 3, 5})) end, ~r/dy must have the type of x/},
      {fn -> Linear.backward(v.x, v.w, v.dy, bias: :maybe) end, ~r/bias must be true or false/},
      {fn -> Linear.backward(v.x, v.w, v.dy, input_grad: 1) end,
       ~r/input_grad must be true or false/},
      {fn -> Linear.backward(v.x, v.w, v.dy, precision: "tf32") end, ~r/precision must be/},
      {fn -> Linear.backward(v.x, v.w, v.dy, into: %{w: f32.({5, 4})}) end,
       ~r/into w must have the shape of w/},
      {fn -> Linear.backward(v.x, v.w, v.dy, into: %{w: f64.({4, 5})}) end,
       ~r/into w must have the type of x/},
      {fn -> Linear.backward(v.x, v.w, v.dy, bias: true, into: %{w: f32.({4, 5})}) end,
       ~r/into must hold a tensor for every parameter gradient/},
      {fn -> Linear.backward(v.x, v.w, v.dy, into: %{w: f32.({4, 5}), bias: f32.({5})}) end,
       ~r/into has keys \[:bias\]/},
      {fn ->
         Linear.backward(v.x, v.w, v.dy, bias: true, into: %{w: f32.({4, 5}), bias: f32.({4})})
       end, ~r/into bias must have shape \{5\}/},
      {fn -> Linear.backward(v.x, v.w, v.dy, into: [w: v.w]) end, ~r/into must be a map/},
      {fn -> Linear.backward(v.x, v.w, v.dy, into: %{w: v.w}) end,
       ~r/into w shares memory with w/},
      {fn ->
         x5 = f32.({5, 4})
         Linear.backward(x5, v.w, f32.({5, 5}), into: %{w: Tensor.reshape(x5, {4, 5})})
       end, ~r/into w shares memory with x/},
      {fn ->
         dy1 = f32.({1, 5})

         Linear.backward(f32.({1, 4}), v.w, dy1,
           bias: true,
           into: %{w: f32.({4, 5}), bias: Tensor.reshape(dy1, {5})}
         )
       end, ~r/into bias shares memory with dy/},
      {fn -> Linear.backward(v.x, v.w, v.dy, into: %{w: :nope}) end,
       ~r/into w must be a Mambex.Tensor or nil/},
      {fn -> Linear.backward(v.x, v.w, v.dy, into: %{x: f32.({2, 3, 5})}) end,
       ~r/into x must have the shape of x, \{2,3,4\}/},
      {fn -> Linear.backward(v.x, v.w, v.dy, into: %{x: f64.({2, 3, 4})}) end,
       ~r/into x must have the type of x/},
      {fn -> Linear.backward(v.x, v.w, v.dy, input_grad: false, into: %{x: f32.({2, 3, 4})}) end,
       ~r/into has keys \[:x\]/},
      {fn -> Linear.backward(v.x, v.w, v.dy, into: %{x: v.x}) end,
       ~r/into x shares memory with x/},
      {fn ->
         acc = f32.({5, 4})

         Linear.backward(f32.({4, 5}), f32.({5, 4}), f32.({4, 4}),
           into: %{w: acc, x: Tensor.reshape(acc, {4, 5})}
         )
       end, ~r/into x shares memory with into w/},
      {fn ->
         dy = f32.({2, 3, 4})
         Linear.backward(v.x, f32.({4, 4}), dy, into: %{x: Tensor.reshape(dy, {2, 3, 4})})
       end, ~r/into x shares memory with dy/},
      {fn -> Linear.backward(v.x, v.w, v.dy, into: %{}) end, ~r/into is empty/},
      {fn -> Linear.backward(v.x, v.w, v.dy, grad: true) end, ~r/linear_backward: unknown keys/}
    ]

    mm = [
      {fn -> Linear.matmul(v.x, v.w) end, ~r/matmul: a must have rank 2/},
      {fn -> Linear.matmul(v.w, v.x) end, ~r/matmul: b must have rank 2/},
      {fn -> Linear.matmul(v.w, v.w) end, ~r/matmul: b: the contracted sizes differ/},
      {fn -> Linear.matmul(v.w, v.w, transpose_b: true, into: f32.({4, 5})) end,
       ~r/into must have shape \{4,4\}/},
      {fn -> Linear.matmul(v.w, v.w, transpose_b: true, beta: 1.0) end,
       ~r/matmul: beta needs into/},
      {fn -> Linear.matmul(v.w, v.w, transpose_b: true, alpha: :one) end,
       ~r/alpha must be a number/},
      {fn -> Linear.matmul(v.w, v.w, transpose_b: true, into: f32.({4, 4}), beta: "1") end,
       ~r/beta must be a number/},
      {fn -> Linear.matmul(v.w, v.w, transpose_a: 1) end, ~r/transpose_a must be true or false/},
      {fn -> Linear.matmul(v.w, f64.({5, 4})) end, ~r/b must have the type of a/},
      {fn ->
         a = f32.({4, 4})
         Linear.matmul(a, f32.({4, 4}), into: Tensor.reshape(a, {2, 8}) |> Tensor.reshape({4, 4}))
       end, ~r/into shares memory with a/},
      {fn ->
         b = f32.({4, 4})
         Linear.matmul(f32.({4, 4}), b, into: Tensor.reshape(b, {4, 4}))
       end, ~r/into shares memory with b/}
    ]

    for {fun, msg} <- fwd ++ bwd ++ mm, do: assert_raise(ArgumentError, msg, fun)
  end

  test "freed tensors raise ArgumentError naming the argument" do
    for key <- [:x, :w, :b] do
      v = valid()
      Tensor.free(v[key])
      name = if key == :b, do: "bias", else: key

      assert_raise ArgumentError, ~r/linear_forward: #{name} was freed/, fn ->
        Linear.forward(v.x, v.w, bias: v.b)
      end
    end

    for key <- [:x, :w, :dy] do
      v = valid()
      Tensor.free(v[key])

      assert_raise ArgumentError, ~r/linear_backward: #{key} was freed/, fn ->
        Linear.backward(v.x, v.w, v.dy)
      end
    end

    v = valid()
    acc = Tensor.zeros({4, 5})
    Tensor.free(acc)

    assert_raise ArgumentError, ~r/linear_backward: into w was freed/, fn ->
      Linear.backward(v.x, v.w, v.dy, into: %{w: acc})
    end

    assert_raise ArgumentError, ~r/matmul: into was freed/, fn ->
      Linear.matmul(Tensor.zeros({4, 4}), v.w, into: acc)
    end

    assert_raise ArgumentError, ~r/matmul: b was freed/, fn ->
      Linear.matmul(Tensor.zeros({4, 4}), acc)
    end
  end

  @garbage [:foo, 1, 2.5, "bytes", [], [1], {}, {1, 2}, %{}, %{ref: :nope}, {:cuda, 99}, -1]

  test "garbage in every argument of the three NIFs raises ArgumentError, never crashes" do
    v = valid()
    bogus = %Tensor{ref: make_ref(), shape: {4, 5}, type: {:f, 32}, device: :cpu}
    acc_w = Tensor.zeros({4, 5})
    acc_b = Tensor.zeros({5})

    nifs = [
      {:linear_forward, [v.x, v.w, v.b, :fp32], []},
      {:linear_backward,
       [v.x, v.w, v.dy, true, true, :tf32, acc_w, acc_b, Tensor.zeros({2, 3, 4})], []},
      # alpha and beta (positions 4, 5; into given) take any number
      {:matmul, [v.w, v.w, false, true, 1.0, 0.5, Tensor.zeros({4, 4}), :fp32], [4, 5]}
    ]

    for {fun, args0, numeric} <- nifs,
        pos <- 0..(length(args0) - 1),
        junk <- [bogus, self() | @garbage],
        not (pos in numeric and is_number(junk)) do
      args = List.replace_at(args0, pos, junk)

      assert_raise ArgumentError, fn -> apply(Mambex.NIF, fun, args) end
    end

    # and the valid calls still work
    for {fun, args, _} <- nifs, do: assert(apply(Mambex.NIF, fun, args))
  end

  # ---- CUDA ------------------------------------------------------------------------

  describe "CUDA" do
    @describetag :cuda

    defp cuda, do: Mambex.TestHelpers.cuda_device()

    for {x_shape, n, bias?} <- @cases ++ [{{3, 130, 70}, 90, true}] do
      test "f32 fp32 against the reference #{inspect(x_shape)} -> #{n} bias: #{bias?}" do
        check_case(
          unquote(Macro.escape(x_shape)),
          unquote(n),
          unquote(bias?),
          {:f, 32},
          cuda(),
          1.0e-5,
          1.0e-4
        )
      end
    end

    # TF32 rounds both operands to a 10-bit mantissa (relative error up to
    # 2^-11 each) before the fp32 accumulation: about 1e-3 on each product,
    # and below 5e-3 in norm on sums of random-sign products.
    test "f32 with precision: :tf32 (5e-3)" do
      for {x_shape, n, bias?} <- [
            {{7, 13}, 5, true},
            {{3, 130, 70}, 90, true},
            {{20, 300}, 30, false}
          ] do
        check_case(x_shape, n, bias?, {:f, 32}, cuda(), 5.0e-3, 5.0e-3, precision: :tf32)
      end
    end

    # Shapes that take the wgmma TF32 kernel on an H200 (gemm_tf32.cu: k 64,
    # 128 or 256, n a multiple of 128, at least 4 row tiles of 64 per block):
    # a partial last tile (4099 rows), with and without bias. The full
    # product is checked against the same product at :fp32 (cuBLASLt), and
    # 256 sampled outputs against float64 dot products; reruns are
    # bit-identical.
    test "f32 :tf32 at the wgmma kernel's shapes (5e-3)" do
      dev = cuda()

      for {m, k, n, bias?} <- [
            {4099, 128, 1024, true},
            {4097, 256, 1024, true},
            {4160, 64, 1024, false},
            {8200, 128, 512, true}
          ] do
        seed = :erlang.phash2({m, k, n})
        x = Tensor.random_uniform({m, k}, seed: seed, min: -1.0, max: 1.0, device: dev)
        w = Tensor.random_uniform({k, n}, seed: seed + 1, min: -1.0, max: 1.0, device: dev)

        b =
          if bias?,
            do: Tensor.random_uniform({n}, seed: seed + 2, min: -1.0, max: 1.0, device: dev)

        opts = if bias?, do: [bias: b], else: []
        y = Linear.forward(x, w, opts ++ [precision: :tf32])
        y_again = Linear.forward(x, w, opts ++ [precision: :tf32])
        assert Tensor.to_binary(y) == Tensor.to_binary(y_again)
        exact = Linear.forward(x, w, opts ++ [precision: :fp32])
        yv = read(y)
        assert rel_err(yv, read(exact)) <= 5.0e-3

        xs = read(x) |> List.to_tuple()
        ws = read(w) |> List.to_tuple()
        bs = if bias?, do: List.to_tuple(read(b))
        ys = List.to_tuple(yv)
        rng = :rand.seed_s(:exsss, {seed, 7, 11})

        Enum.reduce(1..256, rng, fn i, r ->
          {u, r} = :rand.uniform_s(m, r)
          {v, r} = :rand.uniform_s(n, r)
          # the last row (partial tile) first
          row = if i == 1, do: m - 1, else: u - 1
          col = v - 1
          b0 = if bias?, do: elem(bs, col), else: 0.0

          {want, mag} =
            Enum.reduce(0..(k - 1), {b0, abs(b0)}, fn l, {acc, mg} ->
              t = elem(xs, row * k + l) * elem(ws, l * n + col)
              {acc + t, mg + abs(t)}
            end)

          got = elem(ys, row * n + col)
          assert abs(got - want) <= 5.0e-3 * mag, "(#{row}, #{col}): #{got} vs #{want}"
          r
        end)
      end
    end

    test "bf16 (fp32 accumulation) against the reference (1e-2)" do
      # (f32 in the CPU self-check mode: the CPU takes f32/f64 only)
      type = if cuda() == :cpu, do: {:f, 32}, else: {:bf, 16}

      for {x_shape, n, bias?} <- [
            {{7, 13}, 5, true},
            {{3, 130, 70}, 90, true},
            {{300, 7}, 5, true},
            {{700, 9}, 64, true}
          ] do
        check_case(x_shape, n, bias?, type, cuda(), 1.0e-2, 1.0e-2)
      end
    end

    test "matmul: transposes, alpha, beta, into, beta 0 over NaN" do
      check_matmul(cuda(), {:f, 32}, 1.0e-5)
      check_matmul(cuda(), {:f, 32}, 5.0e-3, :tf32)
    end

    test "into: accumulation on CUDA" do
      check_into(cuda(), {:f, 32}, 1.0e-6)
    end

    test "CPU and CUDA agree; CUDA is bit-identical from run to run" do
      in_ = case_inputs({4, 200, 96}, 130, {:f, 32}, :cpu)

      gpu =
        Map.new(Map.take(in_, [:x, :w, :b, :dy]), fn {k, t} ->
          {k, Tensor.to_device(t, cuda())}
        end)

      c = all_bits(in_)
      g1 = all_bits(gpu)
      assert all_bits(gpu) == g1

      for {cb, gb, label} <- Enum.zip([c, g1, [:y, :dx, :dw, :db]]) do
        e = rel_err(Tensor.decode(gb, {:f, 32}), Tensor.decode(cb, {:f, 32}))
        assert e <= 1.0e-5, "#{label}: CPU vs CUDA #{e}"
      end
    end

    test "the bias gradient of many rows (two-stage column sums)" do
      # vector loads (n % 4 == 0) and scalar ones, one split and many
      for {rows, n} <- [{15_360, 33}, {4097, 1}, {1, 300}, {3000, 1025}, {2048, 256}, {999, 12}] do
        {dy, dyv} = rand_tensor({rows, n}, {:f, 32}, cuda())
        x = Tensor.zeros({rows, 1}, device: cuda())
        w = Tensor.zeros({1, n}, device: cuda())
        g = Linear.backward(x, w, dy, bias: true, input_grad: false)

        # each column sum against the size of its terms (a sum of thousands
        # of random signs can cancel to almost nothing: a single column's
        # relative error says nothing then)
        mags = Ref.column_sums(Enum.map(dyv, &abs/1), rows, n)

        for {got, want, mag} <- Enum.zip([read(g.bias), Ref.column_sums(dyv, rows, n), mags]) do
          assert abs(got - want) <= 1.0e-6 * mag,
                 "db rows #{rows} n #{n}: #{got} vs #{want} (terms #{mag})"
        end

        g2 = Linear.backward(x, w, dy, bias: true, input_grad: false)
        assert bits(g2.bias) == bits(g.bias)
      end
    end

    test "tensors on two devices and CUDA types raise ArgumentError" do
      if cuda() != :cpu do
        v = valid()
        wg = Tensor.to_device(v.w, cuda())

        assert_raise ArgumentError, ~r/w is on \{cuda,0\} but x is on cpu/, fn ->
          Linear.forward(v.x, wg)
        end

        xg = Tensor.random_uniform({2, 3, 4}, seed: 1, type: {:f, 64}, device: cuda())

        assert_raise ArgumentError, ~r/x must have type \{:f, 32\} or \{:bf, 16\} on CUDA/, fn ->
          Linear.forward(xg, wg)
        end
      end
    end
  end
end

defmodule Mambex.LinearMemoryTest do
  # Live bytes and handles are global per device: async: false.
  use ExUnit.Case, async: false

  alias Mambex.{Linear, Tensor}

  defp leak_check(device) do
    Mambex.TestHelpers.assert_no_leak(
      device,
      fn ->
        x = Tensor.random_uniform({3, 40, 24}, seed: 1, device: device)
        w = Tensor.random_uniform({24, 16}, seed: 2, device: device)
        b = Tensor.random_uniform({16}, seed: 3, device: device)
        dy = Tensor.random_uniform({3, 40, 16}, seed: 4, device: device)
        acc_w = Tensor.zeros({24, 16}, device: device)
        acc_b = Tensor.zeros({16}, device: device)
        bad = Tensor.zeros({3, 40, 17}, device: device)

        for i <- 1..300 do
          y = Linear.forward(x, w, bias: b)
          g = Linear.backward(x, w, dy, bias: true)
          Linear.backward(x, w, dy, bias: true, into: %{w: acc_w, bias: acc_b})
          c = Linear.matmul(w, w, transpose_a: true)
          if rem(i, 2) == 0, do: Enum.each([y, c | Map.values(g)], &Tensor.free/1)

          try do
            Linear.backward(x, w, bad)
          rescue
            ArgumentError -> :ok
          end
        end

        :erlang.garbage_collect()
      end
    )
  end

  test "live bytes and handles return to their start after many calls, failed ones included" do
    leak_check(:cpu)
  end

  @tag :cuda
  test "on CUDA too" do
    leak_check(Mambex.TestHelpers.cuda_device())
  end
end
