Code.require_file("support/norm_reference.exs", __DIR__)

defmodule Mambex.NormTest do
  # RMSNorm / LayerNorm (Mambex.Norm) against the float64 reference
  # (test/support/norm_reference.exs), finite differences, accumulation,
  # determinism, memory and misuse. Inputs derive from the run's seed
  # (printed by test_helper.exs) and the test's name.
  use ExUnit.Case, async: true

  import Mambex.TestHelpers

  alias Mambex.{Norm, Tensor}
  alias Mambex.NormReference, as: Ref

  setup ctx do
    seed_rand(ctx)
    :ok
  end

  @eps 1.0e-5

  # variants: {kind, residual?, bias?}
  @variants [
    {:rms_norm, false, false},
    {:rms_norm, true, false},
    {:layer_norm, false, false},
    {:layer_norm, false, true},
    {:layer_norm, true, false},
    {:layer_norm, true, true}
  ]

  defp fwd_tol({:f, 32}), do: 1.0e-5
  defp fwd_tol({:f, 64}), do: 1.0e-12
  defp fwd_tol({:bf, 16}), do: 1.0e-2
  defp grad_tol({:f, 32}), do: 1.0e-4
  defp grad_tol({:f, 64}), do: 1.0e-10
  defp grad_tol({:bf, 16}), do: 1.0e-2

  defp dim_of(shape), do: elem(shape, tuple_size(shape) - 1)

  # Random inputs of a case (values representable in their types, never zero).
  defp case_data(shape, io, param, residual?, bias?, d_sum?) do
    n = numel(shape)
    dim = dim_of(shape)

    %{
      shape: shape,
      dim: dim,
      io: io,
      param: param,
      x: rand_values(n, io, lo: 0.1, hi: 2.0),
      residual: if(residual?, do: rand_values(n, io, lo: 0.1, hi: 2.0)),
      w: rand_values(dim, param, lo: 0.5, hi: 1.5),
      b: if(bias?, do: rand_values(dim, param, lo: 0.1, hi: 1.0)),
      dy: rand_values(n, io, lo: 0.1, hi: 1.0),
      d_sum: if(residual? and d_sum?, do: rand_values(n, io, lo: 0.1, hi: 1.0))
    }
  end

  defp tensors(d, device) do
    io = fn v -> v && make(v, d.io, d.shape, device) end
    par = fn v -> v && make(v, d.param, {d.dim}, device) end

    %{
      x: io.(d.x),
      residual: io.(d.residual),
      w: par.(d.w),
      b: par.(d.b),
      dy: io.(d.dy),
      d_sum: io.(d.d_sum)
    }
  end

  # Runs the forward of a variant: {y, sum | nil, ctx}.
  defp forward(kind, t, eps \\ @eps) do
    case {kind, t.residual} do
      {:rms_norm, nil} ->
        {y, ctx} = Norm.rms_norm(t.x, t.w, eps: eps)
        {y, nil, ctx}

      {:rms_norm, r} ->
        Norm.add_rms_norm(t.x, r, t.w, eps: eps)

      {:layer_norm, nil} ->
        {y, ctx} = Norm.layer_norm(t.x, t.w, bias: t.b, eps: eps)
        {y, nil, ctx}

      {:layer_norm, r} ->
        Norm.add_layer_norm(t.x, r, t.w, bias: t.b, eps: eps)
    end
  end

  defp label(kind, d), do: "#{kind} #{inspect(d.shape)} #{inspect(d.io)} (seed #{base_seed()})"

  # ||out - ref|| / max(||ref||, floor): `floor` is the size of the terms a
  # result is a difference of (dx cancels to ~0 when dim = 1).
  defp check(out, ref, tol, what, floor \\ 0.0) do
    assert length(out) == length(ref), "#{what}: #{length(out)} values, expected #{length(ref)}"
    err = rel_err(out, ref)
    ref_norm = ref |> Enum.map(&(&1 * &1)) |> Enum.sum() |> :math.sqrt()
    err = if is_number(err) and ref_norm < floor, do: err * ref_norm / floor, else: err

    assert is_number(err) and err <= tol,
           "#{what}: relative error #{inspect(err)} > #{tol}\nout: #{inspect(Enum.take(out, 6))}\n" <>
             "ref: #{inspect(Enum.take(ref, 6))}"
  end

  # Forward and backward of one case on `device` against the reference.
  defp check_case(device, kind, shape, io, param, residual?, bias?, d_sum?) do
    d = case_data(shape, io, param, residual?, bias?, d_sum?)
    t = tensors(d, device)
    {y, sum, ctx} = forward(kind, t)
    grads = Norm.backward(ctx, t.dy, d_sum: t.d_sum)
    ref = Ref.norm_forward(kind, d.x, d.residual, d.w, d.b, d.dim, @eps)
    rb = Ref.norm_backward(kind, ref.sum, d.w, d.dy, d.d_sum, d.dim, @eps)
    l = label(kind, d) <> " residual=#{residual?} bias=#{bias?} d_sum=#{d_sum?}"

    assert y.shape == shape and y.type == io
    check(read(y), ref.y, fwd_tol(io), "y " <> l)
    check(read(ctx.rstd), ref.rstd, fwd_tol(io), "rstd " <> l)

    if kind == :layer_norm do
      # a row's mean is a sum of terms of either sign: its scale is mean(|s|)
      mean_terms =
        ref.sum
        |> Enum.chunk_every(d.dim)
        |> Enum.map(fn row -> Enum.sum(Enum.map(row, &abs/1)) / d.dim end)
        |> Enum.map(&(&1 * &1))
        |> Enum.sum()
        |> :math.sqrt()

      check(read(ctx.mean), ref.mean, fwd_tol(io), "mean " <> l, mean_terms)
    end

    if residual? do
      assert sum.shape == shape
      check(read(sum), ref.sum, fwd_tol(io), "sum " <> l)
      assert grads.residual == grads.x
    else
      assert sum == nil and not Map.has_key?(grads, :residual)
    end

    assert grads.x.shape == shape and grads.weight.shape == {d.dim}
    # the terms dx is a difference of: rstd * dy * w, row by row
    dx_terms =
      Enum.zip(Enum.chunk_every(d.dy, d.dim), ref.rstd)
      |> Enum.flat_map(fn {row, rs} -> Enum.zip_with(row, d.w, &(rs * &1 * &2)) end)
      |> Enum.map(&(&1 * &1))
      |> Enum.sum()
      |> :math.sqrt()

    check(read(grads.x), rb.dx, grad_tol(io), "dx " <> l, dx_terms)
    check(read(grads.weight), rb.dw, grad_tol(io), "dweight " <> l)

    if bias? do
      check(read(grads.bias), rb.db, grad_tol(io), "dbias " <> l)
    else
      refute Map.has_key?(grads, :bias)
    end
  end

  @shapes [{7}, {1, 1}, {3, 3}, {2, 3, 100}, {5, 257}, {1, 1000}, {4, 256}, {1, 64}, {33, 12}]

  describe "f32 on the CPU against the float64 reference" do
    for shape <- @shapes do
      test "shape #{inspect(shape)}" do
        for {{kind, res, bias}, i} <- Enum.with_index(@variants) do
          check_case(
            :cpu,
            kind,
            unquote(Macro.escape(shape)),
            {:f, 32},
            {:f, 32},
            res,
            bias,
            rem(i, 2) == 1
          )
        end
      end
    end

    test "many rows (the thread pool and several partial sums)" do
      check_case(:cpu, :rms_norm, {300, 256}, {:f, 32}, {:f, 32}, true, false, true)
      check_case(:cpu, :layer_norm, {1100, 61}, {:f, 32}, {:f, 32}, true, true, false)
    end
  end

  test "f64 on the CPU against the float64 reference" do
    for shape <- [{1, 1}, {3, 7}, {2, 3, 100}, {4, 257}],
        {{kind, res, bias}, i} <- Enum.with_index(@variants) do
      check_case(:cpu, kind, shape, {:f, 64}, {:f, 64}, res, bias, rem(i, 2) == 0)
    end
  end

  # ---- finite differences -----------------------------------------------------

  # loss = sum(y * gy) + sum(sum * gs) (the second term with a residual).
  defp fd_check(kind, residual?, bias?, forward_fun, grads_fun) do
    shape = {2, 5}
    d = case_data(shape, {:f, 64}, {:f, 64}, residual?, bias?, true)
    gy = d.dy
    gs = d.d_sum

    loss = fn p ->
      {y, s} = forward_fun.(p)
      dot(y, gy) + if(residual?, do: dot(s, gs), else: 0.0)
    end

    p0 = %{x: d.x, residual: d.residual, w: d.w, b: d.b}
    analytic = grads_fun.(p0, gy, gs)
    h = 1.0e-6

    for key <- [:x, :residual, :w, :b], p0[key] != nil do
      numeric =
        for i <- 0..(length(p0[key]) - 1) do
          plus = Map.update!(p0, key, &List.update_at(&1, i, fn v -> v + h end))
          minus = Map.update!(p0, key, &List.update_at(&1, i, fn v -> v - h end))
          (loss.(plus) - loss.(minus)) / (2 * h)
        end

      check(
        analytic[key],
        numeric,
        1.0e-6,
        "finite differences of #{key}, #{kind} residual=#{residual?} bias=#{bias?} (seed #{base_seed()})"
      )
    end
  end

  defp dot(a, b), do: Enum.zip_with(a, b, &(&1 * &2)) |> Enum.sum()

  test "finite differences check the reference backward" do
    for {kind, res, bias} <- @variants do
      fwd = fn p ->
        r = Ref.norm_forward(kind, p.x, p.residual, p.w, p.b, 5, @eps)
        {r.y, r.sum}
      end

      grads = fn p, gy, gs ->
        s = Ref.norm_forward(kind, p.x, p.residual, p.w, p.b, 5, @eps).sum
        r = Ref.norm_backward(kind, s, p.w, gy, gs, 5, @eps)
        %{x: r.dx, residual: r.dx, w: r.dw, b: r.db}
      end

      fd_check(kind, res, bias, fwd, grads)
    end
  end

  test "finite differences check the f64 CPU backward (x, residual, weight, bias)" do
    for {kind, res, bias} <- @variants do
      tens = fn p ->
        %{
          x: make(p.x, {:f, 64}, {2, 5}, :cpu),
          residual: p.residual && make(p.residual, {:f, 64}, {2, 5}, :cpu),
          w: make(p.w, {:f, 64}, {5}, :cpu),
          b: p.b && make(p.b, {:f, 64}, {5}, :cpu)
        }
      end

      fwd = fn p ->
        {y, s, _ctx} = forward(kind, tens.(p))
        {read(y), s && read(s)}
      end

      grads = fn p, gy, gs ->
        {_y, _s, ctx} = forward(kind, tens.(p))
        d_sum = if res, do: make(gs, {:f, 64}, {2, 5}, :cpu)
        g = Norm.backward(ctx, make(gy, {:f, 64}, {2, 5}, :cpu), d_sum: d_sum)

        %{
          x: read(g.x),
          residual: g[:residual] && read(g.residual),
          w: read(g.weight),
          b: g[:bias] && read(g.bias)
        }
      end

      fd_check(kind, res, bias, fwd, grads)
    end
  end

  # ---- accumulation, determinism, empty ------------------------------------------

  defp accumulation(device) do
    for {kind, res, bias} <- [{:rms_norm, true, false}, {:layer_norm, false, true}] do
      d = case_data({37, 40}, {:f, 32}, {:f, 32}, res, bias, false)
      t = tensors(d, device)
      {_y, _s, ctx} = forward(kind, t)
      dy2 = make(rand_values(37 * 40, {:f, 32}), {:f, 32}, {37, 40}, device)
      g1 = Norm.backward(ctx, t.dy)
      g2 = Norm.backward(ctx, dy2)
      keys = if bias, do: [:weight, :bias], else: [:weight]
      into = Map.new(keys, &{&1, Tensor.zeros({40}, type: {:f, 32}, device: device)})
      a1 = Norm.backward(ctx, t.dy, into: into)
      a2 = Norm.backward(ctx, dy2, into: into)

      for k <- keys do
        assert a1[k] == into[k] and a2[k] == into[k], "the into tensor is returned"
        want = Enum.zip_with(read(g1[k]), read(g2[k]), &(&1 + &2))
        check(read(into[k]), want, 1.0e-6, "accumulated #{k} #{kind}")
      end

      # input gradients are new tensors, equal to a plain call's
      assert read(a2.x) == read(g2.x)
    end
  end

  test "into: accumulates in place and equals the sum of two separate calls" do
    accumulation(:cpu)
  end

  defp determinism(device, shape) do
    d = case_data(shape, {:f, 32}, {:f, 32}, true, true, true)
    t = tensors(d, device)

    run = fn ->
      {y, s, ctx} = forward(:layer_norm, t)
      g = Norm.backward(ctx, t.dy, d_sum: t.d_sum)
      Enum.map([y, s, ctx.mean, ctx.rstd, g.x, g.weight, g.bias], &Tensor.to_binary/1)
    end

    first = run.()
    for _ <- 1..3, do: assert(run.() == first)

    concurrent =
      1..4 |> Enum.map(fn _ -> Task.async(run) end) |> Enum.map(&Task.await(&1, 60_000))

    assert Enum.all?(concurrent, &(&1 == first))
  end

  test "results are bit-identical from run to run, and under concurrent calls" do
    determinism(:cpu, {700, 256})
    determinism(:cpu, {60, 33})
  end

  defp empty_rows(device) do
    x = Tensor.zeros({0, 8}, type: {:f, 32}, device: device)
    w = make(rand_values(8, {:f, 32}), {:f, 32}, {8}, device)
    b = make(rand_values(8, {:f, 32}), {:f, 32}, {8}, device)
    {y, ctx} = Norm.layer_norm(x, w, bias: b)
    assert y.shape == {0, 8} and ctx.rstd.shape == {0} and ctx.mean.shape == {0}
    g = Norm.backward(ctx, x)
    assert g.x.shape == {0, 8}
    assert read(g.weight) == List.duplicate(0.0, 8) and read(g.bias) == List.duplicate(0.0, 8)
    into = %{weight: w, bias: b}
    before = {read(w), read(b)}
    Norm.backward(ctx, x, into: into)
    assert {read(w), read(b)} == before
  end

  test "zero rows give empty outputs, zero parameter gradients, unchanged into" do
    empty_rows(:cpu)
  end

  test "eps enters rstd" do
    x = make([1.0, -1.0], {:f, 64}, {1, 2}, :cpu)
    w = make([1.0, 1.0], {:f, 64}, {2}, :cpu)
    {_y, ctx} = Norm.rms_norm(x, w, eps: 3.0)
    assert_in_delta hd(read(ctx.rstd)), 0.5, 1.0e-15
    {_y, ctx} = Norm.rms_norm(x, w)
    assert_in_delta hd(read(ctx.rstd)), 1.0 / :math.sqrt(1.0 + 1.0e-5), 1.0e-15
    assert ctx.eps == 1.0e-5
  end

  # ---- memory and misuse --------------------------------------------------------

  defp raises_naming(fun, name) do
    e = assert_raise ArgumentError, fun
    assert e.message =~ name, "expected the message to name #{inspect(name)}: #{e.message}"
  end

  test "misuse raises ArgumentError naming the argument" do
    d = case_data({3, 4}, {:f, 32}, {:f, 32}, true, true, true)
    t = tensors(d, :cpu)
    f64 = make(rand_values(12, {:f, 64}), {:f, 64}, {3, 4}, :cpu)
    w5 = make(rand_values(5, {:f, 32}), {:f, 32}, {5}, :cpu)
    x35 = make(rand_values(15, {:f, 32}), {:f, 32}, {3, 5}, :cpu)
    s32 = Tensor.zeros({3, 4}, type: {:s, 32})

    raises_naming(fn -> Norm.rms_norm(:garbage, t.w) end, "x")
    raises_naming(fn -> Norm.rms_norm(t.x, "w") end, "weight")
    raises_naming(fn -> Norm.rms_norm(t.x, w5) end, "weight")
    raises_naming(fn -> Norm.rms_norm(s32, t.w) end, "x")
    raises_naming(fn -> Norm.rms_norm(f64, t.w) end, "weight")
    raises_naming(fn -> Norm.rms_norm(t.x, t.w, eps: -1.0) end, "eps")
    raises_naming(fn -> Norm.rms_norm(t.x, t.w, eps: :nan) end, "eps")
    raises_naming(fn -> Norm.rms_norm(t.x, t.w, bias: t.b) end, "bias")
    raises_naming(fn -> Norm.rms_norm(t.x, t.w, [:bad]) end, "options")
    raises_naming(fn -> Norm.rms_norm(Tensor.zeros({3, 0}), Tensor.zeros({0})) end, "x")

    raises_naming(
      fn ->
        Norm.rms_norm(Tensor.from_binary(<<1.0::float-32-native>>, {:f, 32}, shape: {}), t.w)
      end,
      "x"
    )

    raises_naming(fn -> Norm.add_rms_norm(t.x, nil, t.w) end, "residual")
    raises_naming(fn -> Norm.add_rms_norm(t.x, x35, t.w) end, "residual")
    raises_naming(fn -> Norm.add_rms_norm(t.x, f64, t.w) end, "residual")
    raises_naming(fn -> Norm.add_layer_norm(t.x, t.residual, t.w, bias: w5) end, "bias")
    raises_naming(fn -> Norm.layer_norm(t.x, t.w, bias: 3) end, "bias")
    raises_naming(fn -> Norm.layer_norm(t.x, t.w, scale: 3) end, "scale")

    {_y, _s, ctx} = forward(:layer_norm, t)
    {_y, rctx} = Norm.rms_norm(t.x, t.w)
    raises_naming(fn -> Norm.backward(:ctx, t.dy) end, "context")
    raises_naming(fn -> Norm.backward(ctx, x35) end, "dy")
    raises_naming(fn -> Norm.backward(ctx, f64) end, "dy")
    raises_naming(fn -> Norm.backward(ctx, nil) end, "dy")
    raises_naming(fn -> Norm.backward(ctx, t.dy, d_sum: x35) end, "d_sum")
    raises_naming(fn -> Norm.backward(rctx, t.dy, d_sum: t.dy) end, "d_sum")
    raises_naming(fn -> Norm.backward(ctx, t.dy, into: %{weight: Tensor.zeros({4})}) end, "into")
    raises_naming(fn -> Norm.backward(rctx, t.dy, into: %{weight: w5}) end, "into weight")
    raises_naming(fn -> Norm.backward(rctx, t.dy, into: %{weight: t.w, x: t.w}) end, "into")
    raises_naming(fn -> Norm.backward(rctx, t.dy, into: [weight: t.w]) end, "into")

    z = Tensor.zeros({4})
    raises_naming(fn -> Norm.backward(ctx, t.dy, into: %{weight: z, bias: z}) end, "into")
    raises_naming(fn -> Norm.backward(%{ctx | rstd: w5}, t.dy) end, "rstd")
    raises_naming(fn -> Norm.backward(%{ctx | mean: nil}, t.dy) end, "mean")

    # freed tensors
    dead = make(rand_values(12, {:f, 32}), {:f, 32}, {3, 4}, :cpu)
    Tensor.free(dead)
    raises_naming(fn -> Norm.rms_norm(dead, t.w) end, "x")
    raises_naming(fn -> Norm.add_rms_norm(t.x, dead, t.w) end, "residual")
    raises_naming(fn -> Norm.backward(ctx, dead) end, "dy")
    raises_naming(fn -> Norm.backward(%{ctx | s: dead}, t.dy) end, "x")

    # the NIF on its own: garbage in every position
    args = [:layer_norm, t.x, t.residual, t.w, t.b, 1.0e-5]

    for i <- 0..5, bad <- [:junk, "str", -1, {1}] do
      a = List.replace_at(args, i, bad)
      # nil is valid for residual and bias; numbers for eps
      unless i == 5 and is_number(bad) and bad >= 0 do
        assert arg_error_outcome(fn -> apply(Mambex.NIF, :norm_forward, a) end) == nil,
               "norm_forward argument #{i} = #{inspect(bad)}"
      end
    end

    bargs = [:layer_norm, ctx.s, t.w, t.b, ctx.mean, ctx.rstd, t.dy, nil, nil, nil]

    for i <- 0..9, bad <- [:junk, 2.5, {1}] do
      a = List.replace_at(bargs, i, bad)

      assert arg_error_outcome(fn -> apply(Mambex.NIF, :norm_backward, a) end) == nil,
             "norm_backward argument #{i} = #{inspect(bad)}"
    end
  end

  # ---- CUDA ------------------------------------------------------------------------

  describe "CUDA" do
    @describetag :cuda

    @cuda_shapes [
      {1, 1},
      {3, 3},
      {2, 3, 100},
      {5, 257},
      {2, 1000},
      {7, 256},
      {3, 64},
      {2, 1024},
      {2, 2048},
      {300, 256},
      {1100, 12},
      {1, 8192}
    ]

    test "f32 io against the float64 reference (vector and generic paths)" do
      for shape <- @cuda_shapes, {{kind, res, bias}, i} <- Enum.with_index(@variants) do
        check_case(cuda_device(), kind, shape, {:f, 32}, {:f, 32}, res, bias, rem(i, 2) == 1)
      end
    end

    test "bf16 io with f32 parameters against the reference (1e-2)" do
      # (the CPU has no bf16 io: nothing to check in the CUDA-as-CPU self-check)
      for shape <- [{3, 3}, {4, 256}, {2, 3, 100}, {300, 256}, {2, 1000}],
          cuda_device() != :cpu,
          {{kind, res, bias}, i} <- Enum.with_index(@variants) do
        check_case(cuda_device(), kind, shape, {:bf, 16}, {:f, 32}, res, bias, rem(i, 2) == 0)
      end
    end

    test "CPU and CUDA agree (f32)" do
      for shape <- [{5, 257}, {300, 256}, {4, 1024}],
          {kind, res, bias} <- @variants do
        d = case_data(shape, {:f, 32}, {:f, 32}, res, bias, res)

        outs =
          for dev <- [:cpu, cuda_device()] do
            t = tensors(d, dev)
            {y, s, ctx} = forward(kind, t)
            g = Norm.backward(ctx, t.dy, d_sum: t.d_sum)

            %{
              y: read(y),
              s: s && read(s),
              rstd: read(ctx.rstd),
              dx: read(g.x),
              dw: read(g.weight),
              db: g[:bias] && read(g.bias)
            }
          end

        [c, g] = outs
        l = "#{kind} #{inspect(shape)} residual=#{res} bias=#{bias}"
        check(g.y, c.y, 1.0e-5, "y " <> l)
        check(g.rstd, c.rstd, 1.0e-5, "rstd " <> l)
        if res, do: assert(g.s == c.s, "sum " <> l)
        check(g.dx, c.dx, 1.0e-4, "dx " <> l)
        check(g.dw, c.dw, 1.0e-4, "dw " <> l)
        if bias, do: check(g.db, c.db, 1.0e-4, "db " <> l)
      end
    end

    test "bit-identical reruns (vector and generic paths)" do
      determinism(cuda_device(), {4000, 256})
      determinism(cuda_device(), {500, 100})
    end

    test "into: accumulation" do
      accumulation(cuda_device())
    end

    test "zero rows" do
      empty_rows(cuda_device())
    end

    test "f64 is refused on CUDA, mixed devices raise naming the argument" do
      dev = cuda_device()

      if dev != :cpu do
        x = Tensor.zeros({2, 4}, type: {:f, 64}, device: dev)
        w = Tensor.zeros({4}, type: {:f, 32}, device: dev)
        raises_naming(fn -> Norm.rms_norm(x, w) end, "x")
        x = Tensor.ones({2, 4}, device: dev)
        raises_naming(fn -> Norm.rms_norm(x, Tensor.ones({4})) end, "weight")
        raises_naming(fn -> Norm.add_rms_norm(x, Tensor.ones({2, 4}), w) end, "residual")
      end
    end
  end
end

defmodule Mambex.NormLeakTest do
  # Memory statistics are per device and global: `async: false` (ExUnit runs
  # it alone, after the async modules).
  use ExUnit.Case, async: false

  import Mambex.TestHelpers

  alias Mambex.{Norm, Tensor}

  defp leak_check(device) do
    seed_rand({__MODULE__, device})
    t = fn shape -> make(rand_values(numel(shape), {:f, 32}), {:f, 32}, shape, device) end

    {x, r, w, b, dy, ds} =
      {t.({20, 24}), t.({20, 24}), t.({24}), t.({24}), t.({20, 24}), t.({20, 24})}

    into = %{weight: Tensor.zeros({24}, device: device), bias: Tensor.zeros({24}, device: device)}
    base = settled_stats(device)

    for i <- 1..300 do
      {_y, _s, ctx} = Norm.add_layer_norm(x, r, w, bias: b)
      Norm.backward(ctx, dy, d_sum: ds, into: if(rem(i, 2) == 0, do: into))
      {_y, ctx} = Norm.rms_norm(x, w)
      Norm.backward(ctx, dy)
      # failing calls hold nothing either
      assert_raise ArgumentError, fn -> Norm.backward(ctx, w) end
    end

    after_ = settled_stats(device, base)
    assert after_.live_bytes == base.live_bytes
    assert after_.live_handles == base.live_handles
    # the inputs stay alive (and counted) until here
    assert Enum.all?([x, r, w, b, dy, ds, into.weight, into.bias], &Tensor.live?/1)
  end

  test "live bytes and handles return to their start after many calls" do
    leak_check(:cpu)
  end

  @tag :cuda
  test "on CUDA too" do
    leak_check(cuda_device())
  end
end
