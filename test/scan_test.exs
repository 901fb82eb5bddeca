Code.require_file("support/scan_reference.exs", __DIR__)

defmodule Mambex.ScanTestHelpers do
  @moduledoc false
  # Inputs, tensors and comparisons for the scan tests. Every test derives
  # its seed from ExUnit's seed and its own name, and prints both on failure.

  import Bitwise
  import ExUnit.Assertions
  alias Mambex.Tensor

  @io_keys [:u, :delta, :z, :b, :c]

  def seed_for(name), do: :erlang.phash2({ExUnit.configuration()[:seed], name}, 1 <<< 30)

  def seed_note(seed), do: "(case seed #{seed}, ExUnit seed #{ExUnit.configuration()[:seed]})"

  # Uniform floats in [lo, hi) from an explicit :rand state.
  def uniform(rng, count, lo, hi) do
    {list, rng} =
      Enum.map_reduce(1..count//1, rng, fn _, r ->
        {x, r} = :rand.uniform_s(r)
        {lo + (hi - lo) * x, r}
      end)

    {list, rng}
  end

  @doc """
  Random, realistic Mamba inputs for dims {batch, len, dim, dstate, groups}.

  opts: :d, :z, :delta_bias, :initial_state, :reset (booleans), :softplus,
  :grouped (b/c as (B,L,G,N) even for G = 1), :io and :param types.
  Values are rounded to the io/param types, so the float64 reference sees
  exactly what the kernel sees. Returns %{ref: reference inputs, shapes,
  d_out, d_final}.
  """
  def make_inputs(seed, {bsz, len, dim, n, g} = dims, opts) do
    io = Keyword.get(opts, :io, {:f, 32})
    param = Keyword.get(opts, :param, io)
    softplus = Keyword.get(opts, :softplus, true)
    bias? = Keyword.get(opts, :delta_bias, false)
    rng = :rand.seed_s(:exsss, {seed, 0x5CA7, 17})
    bld = bsz * len * dim
    blgn = bsz * len * g * n

    {u, rng} = uniform(rng, bld, -1.0, 1.0)
    # softplus(delta + bias) lands in (0.007, 0.7) or so; without softplus,
    # delta itself is a step size.
    {delta, rng} =
      cond do
        not softplus -> uniform(rng, bld, 0.01, 0.4)
        bias? -> uniform(rng, bld, -1.0, 1.0)
        true -> uniform(rng, bld, -4.0, 0.5)
      end

    {a_exp, rng} = uniform(rng, dim * n, -1.0, 1.5)
    a = Enum.map(a_exp, &(-:math.exp(&1)))
    {b, rng} = uniform(rng, blgn, -1.0, 1.0)
    {c, rng} = uniform(rng, blgn, -1.0, 1.0)
    {d, rng} = uniform(rng, dim, 0.5, 1.5)
    {z, rng} = uniform(rng, bld, -2.0, 2.0)

    {bias, rng} =
      if softplus, do: uniform(rng, dim, -4.0, -1.0), else: uniform(rng, dim, 0.0, 0.1)

    {h0, rng} = uniform(rng, bsz * dim * n, -1.0, 1.0)
    {r, rng} = uniform(rng, bsz * len, 0.0, 1.0)
    {d_out, rng} = uniform(rng, bld, -1.0, 1.0)
    {d_final, _rng} = uniform(rng, bsz * dim * n, -1.0, 1.0)
    reset = Enum.map(r, &if(&1 < 0.1, do: 1, else: 0))

    pick = fn key, val -> if Keyword.get(opts, key, false), do: val, else: nil end

    ref = %{
      dims: dims,
      softplus: softplus,
      u: round_to(u, io),
      delta: round_to(delta, io),
      a: round_to(a, param),
      b: round_to(b, io),
      c: round_to(c, io),
      d: pick.(:d, round_to(d, param)),
      z: pick.(:z, round_to(z, io)),
      delta_bias: pick.(:delta_bias, round_to(bias, param)),
      initial_state: pick.(:initial_state, round_to(h0, param)),
      reset: pick.(:reset, reset)
    }

    grouped = g > 1 or Keyword.get(opts, :grouped, false)
    bc_shape = if grouped, do: {bsz, len, g, n}, else: {bsz, len, n}

    shapes = %{
      u: {bsz, len, dim},
      delta: {bsz, len, dim},
      z: {bsz, len, dim},
      a: {dim, n},
      b: bc_shape,
      c: bc_shape,
      d: {dim},
      delta_bias: {dim},
      initial_state: {bsz, dim, n},
      reset: {bsz, len}
    }

    %{
      ref: ref,
      shapes: shapes,
      io: io,
      param: param,
      d_out: round_to(d_out, io),
      d_final: round_to(d_final, param)
    }
  end

  def type_of(_inputs, :reset), do: {:u, 8}
  def type_of(inputs, key) when key in @io_keys, do: inputs.io
  def type_of(inputs, _key), do: inputs.param

  @doc "Tensors of the given inputs on a device (only those present)."
  def tensors(inputs, device) do
    for {key, shape} <- inputs.shapes, list = inputs.ref[key], list != nil, into: %{} do
      {key, tensor(list, shape, type_of(inputs, key), device)}
    end
  end

  def tensor(list, shape, type, device \\ :cpu),
    do: Tensor.from_binary(encode(list, type), type, shape: shape, device: device)

  def encode(list, {:f, 32}), do: for(x <- list, into: <<>>, do: <<x::float-32-native>>)
  def encode(list, {:f, 64}), do: for(x <- list, into: <<>>, do: <<x::float-64-native>>)
  def encode(list, {:u, 8}), do: for(x <- list, into: <<>>, do: <<x::8>>)
  def encode(list, {:bf, 16}), do: for(x <- list, into: <<>>, do: <<bf16_bits(x)::16-native>>)

  def encode(list, {:f, 16}) do
    # through Erlang's own half-precision encoding (OTP 24: float-16 segments)
    for x <- list, into: <<>>, do: <<x::float-16-native>>
  end

  defp bf16_bits(x) do
    <<bits::32>> = <<x::float-32>>
    (bits + 0x7FFF + (bits >>> 16 &&& 1)) >>> 16
  end

  def round_to(list, {:f, 64}), do: list
  def round_to(list, {:u, 8}), do: list
  def round_to(list, type), do: Tensor.decode(encode(list, type), type)

  def values(%Tensor{} = t), do: Tensor.to_flat_list(t)

  @doc "Options for Mambex.Scan.forward/6 from the tensors."
  def forward_opts(ts, inputs) do
    [
      d: ts[:d],
      z: ts[:z],
      delta_bias: ts[:delta_bias],
      initial_state: ts[:initial_state],
      reset: ts[:reset],
      softplus: inputs.ref.softplus
    ]
  end

  def run_forward(ts, inputs) do
    Mambex.Scan.forward(ts.u, ts.delta, ts.a, ts.b, ts.c, forward_opts(ts, inputs))
  end

  @doc "‖x − y‖ / ‖y‖ (‖x − y‖ when y is all zeros; :infinity if anything is not finite)."
  def rel_err(x, y) do
    if Enum.all?(x, &is_number/1) and Enum.all?(y, &is_number/1),
      do: rel_err_finite(x, y),
      else: :infinity
  end

  defp rel_err_finite(x, y) do
    {num, den} =
      Enum.zip_reduce(x, y, {0.0, 0.0}, fn a, b, {n, d} ->
        {n + (a - b) * (a - b), d + b * b}
      end)

    if length(x) != length(y), do: raise("length mismatch: #{length(x)} vs #{length(y)}")
    if den == 0.0, do: :math.sqrt(num), else: :math.sqrt(num / den)
  end

  @doc "Forward and backward on `device` against the float64 reference, within the tolerances."
  def check_reference(name, dims, opts, device, fwd_tol, grad_tol) do
    seed = seed_for(name)
    inputs = make_inputs(seed, dims, opts)
    ts = tensors(inputs, device)
    {out, fin, ctx} = run_forward(ts, inputs)
    ref = Mambex.ScanReference.forward(inputs.ref)

    {bsz, len, dim, n, _g} = dims
    assert out.shape == {bsz, len, dim}
    assert fin.shape == {bsz, dim, n}
    e = rel_err(values(out), ref.out)
    assert e <= fwd_tol, "#{name}: out rel. error #{e} > #{fwd_tol} #{seed_note(seed)}"
    e = rel_err(values(fin), ref.final_state)
    assert e <= fwd_tol, "#{name}: final state rel. error #{e} > #{fwd_tol} #{seed_note(seed)}"

    d_out = tensor(inputs.d_out, {bsz, len, dim}, inputs.io, device)
    d_fin = tensor(inputs.d_final, {bsz, dim, n}, inputs.param, device)
    grads = Mambex.Scan.backward(ctx, d_out, d_final_state: d_fin)
    rgrads = Mambex.ScanReference.backward(inputs.ref, inputs.d_out, inputs.d_final)
    assert Enum.sort(Map.keys(grads)) == Enum.sort(Map.keys(rgrads))

    for {key, rg} <- rgrads do
      g = grads[key]
      assert g.shape == ts[key].shape, "#{name}: gradient of #{key} has shape #{inspect(g.shape)}"
      assert g.type == ts[key].type
      e = rel_err(values(g), rg)

      assert e <= grad_tol,
             "#{name}: gradient of #{key}: rel. error #{e} > #{grad_tol} #{seed_note(seed)}"
    end

    {inputs, ts, out, fin, grads}
  end
end

defmodule Mambex.ScanTest do
  use ExUnit.Case, async: true
  import Mambex.ScanTestHelpers

  alias Mambex.ScanReference, as: Ref
  alias Mambex.{Scan, Tensor}

  @moduletag timeout: 300_000

  # :cuda and :slow tests are excluded by test_helper.exs unless a GPU answers
  # (or MAMBEX_SLOW=1); the :cuda ones run on Mambex.TestHelpers.cuda_device().
  @all [d: true, z: true, delta_bias: true, initial_state: true, reset: true]

  # {name, {batch, len, dim, dstate, groups}, options}: odd sizes, each option
  # on and off, both layouts of b/c; every option set is checked forward and
  # backward.
  @cases [
    {"tiny", {1, 1, 1, 1, 1}, @all},
    {"L2 grouped", {3, 2, 24, 4, 2}, @all},
    {"L59 bare", {1, 59, 24, 16, 1}, [softplus: false]},
    {"L61 D100 all", {3, 61, 100, 4, 2}, @all},
    {"L128 z only", {1, 128, 24, 16, 2}, [z: true]},
    {"L129 N1", {3, 129, 24, 1, 1}, [d: true, delta_bias: true, reset: true, grouped: true]},
    {"L129 D100 N16", {1, 129, 100, 16, 1},
     [z: true, d: true, delta_bias: true, initial_state: true]},
    {"L60 no softplus", {2, 60, 40, 16, 2},
     [softplus: false, z: true, initial_state: true, reset: true]},
    {"N256", {1, 3, 4, 256, 1}, @all},
    {"L127 D100 G4", {2, 127, 100, 8, 4}, @all},
    {"L1 batch 3 G4", {3, 1, 100, 16, 4}, [z: true, initial_state: true]},
    {"L1024", {1, 1024, 24, 16, 1}, [z: true, d: true, delta_bias: true, reset: true]}
  ]

  describe "f32 on the CPU against the float64 reference" do
    for {name, dims, opts} <- @cases do
      test "#{name} #{inspect(dims)} #{inspect(opts)}" do
        check_reference(
          unquote(name),
          unquote(Macro.escape(dims)),
          unquote(opts),
          :cpu,
          1.0e-5,
          1.0e-4
        )
      end
    end
  end

  describe "f64 on the CPU against the float64 reference" do
    test "L61 D24 all options" do
      opts = [io: {:f, 64}] ++ @all
      check_reference("f64 L61", {2, 61, 24, 16, 2}, opts, :cpu, 1.0e-12, 1.0e-11)
    end

    test "L40 no softplus, z only" do
      check_reference(
        "f64 bare",
        {1, 40, 20, 4, 1},
        [io: {:f, 64}, softplus: false, z: true],
        :cpu,
        1.0e-12,
        1.0e-11
      )
    end
  end

  describe "slow f32 cases" do
    @describetag :slow
    test "L1024 D64 N16 all options" do
      check_reference("slow L1024", {1, 1024, 64, 16, 1}, @all, :cpu, 1.0e-5, 1.0e-4)
    end

    test "L2049 D24 N64 G2" do
      check_reference(
        "slow L2049",
        {1, 2049, 24, 64, 2},
        [z: true, d: true, delta_bias: true],
        :cpu,
        1.0e-5,
        1.0e-4
      )
    end

    test "L32 D512 N64 G4 batch 2" do
      check_reference("slow D512", {2, 32, 512, 64, 4}, @all, :cpu, 1.0e-5, 1.0e-4)
    end
  end

  # ---- finite differences (float64) ------------------------------------------

  @fd_dims {2, 4, 4, 3, 2}
  @fd_keys [:u, :delta, :a, :b, :c, :d, :z, :delta_bias, :initial_state]

  # loss = Σ out·d_out + Σ final·d_final, so d loss / d x is the backward's
  # gradient of x for (d_out, d_final).
  defp loss(fwd, inputs) do
    Enum.zip_reduce(fwd.out, inputs.d_out, 0.0, fn a, b, s -> s + a * b end) +
      Enum.zip_reduce(fwd.final_state, inputs.d_final, 0.0, fn a, b, s -> s + a * b end)
  end

  defp finite_differences(inputs, forward_fun) do
    eps = 1.0e-6

    for key <- @fd_keys, inputs.ref[key] != nil, into: %{} do
      list = inputs.ref[key]

      grad =
        for i <- 0..(length(list) - 1) do
          x = Enum.at(list, i)
          plus = put_in(inputs.ref[key], List.replace_at(list, i, x + eps))
          minus = put_in(inputs.ref[key], List.replace_at(list, i, x - eps))
          (loss(forward_fun.(plus), inputs) - loss(forward_fun.(minus), inputs)) / (2 * eps)
        end

      {key, grad}
    end
  end

  defp c_forward_f64(inputs) do
    ts = tensors(inputs, :cpu)
    {out, fin, _} = run_forward(ts, inputs)
    %{out: values(out), final_state: values(fin)}
  end

  for softplus <- [true, false] do
    test "finite differences check the reference backward (softplus: #{softplus})" do
      seed = seed_for("fd ref #{unquote(softplus)}")
      inputs = make_inputs(seed, @fd_dims, [io: {:f, 64}, softplus: unquote(softplus)] ++ @all)
      fd = finite_differences(inputs, &Ref.forward(&1.ref))
      grads = Ref.backward(inputs.ref, inputs.d_out, inputs.d_final)

      for {key, g} <- fd do
        e = rel_err(grads[key], g)

        assert e <= 1.0e-6,
               "reference gradient of #{key} vs finite differences: #{e} #{seed_note(seed)}"
      end
    end

    test "finite differences check the f64 CPU backward (softplus: #{softplus})" do
      seed = seed_for("fd cpu #{unquote(softplus)}")
      inputs = make_inputs(seed, @fd_dims, [io: {:f, 64}, softplus: unquote(softplus)] ++ @all)
      fd = finite_differences(inputs, &c_forward_f64/1)
      ts = tensors(inputs, :cpu)
      {_out, _fin, ctx} = run_forward(ts, inputs)
      {bsz, len, dim, n, _} = @fd_dims

      grads =
        Scan.backward(ctx, tensor(inputs.d_out, {bsz, len, dim}, {:f, 64}),
          d_final_state: tensor(inputs.d_final, {bsz, dim, n}, {:f, 64})
        )

      assert Enum.sort(Map.keys(grads)) == Enum.sort(Map.keys(fd))

      for {key, g} <- fd do
        e = rel_err(values(grads[key]), g)

        assert e <= 1.0e-6,
               "CPU f64 gradient of #{key} vs finite differences: #{e} #{seed_note(seed)}"
      end
    end
  end

  # ---- split sequences, resets --------------------------------------------------

  defp slice_all(ts, start, len) do
    Map.new(ts, fn
      {key, t} when key in [:u, :delta, :z, :b, :c, :reset] ->
        {key, Tensor.slice(t, 1, start, len)}

      other ->
        other
    end)
  end

  defp bits(%Tensor{} = t), do: Tensor.to_binary(t)

  for {io, split} <- [{{:f, 32}, 30}, {{:f, 32}, 1}, {{:f, 64}, 45}] do
    test "a split sequence gives the outputs and gradients of one call (#{inspect(io)}, split at #{split})" do
      io = unquote(Macro.escape(io))
      split = unquote(split)
      seed = seed_for("split #{inspect(io)} #{split}")
      {bsz, len, dim, n, _g} = dims = {2, 61, 24, 16, 2}
      inputs = make_inputs(seed, dims, [io: io] ++ @all)
      ts = tensors(inputs, :cpu)
      d_out = tensor(inputs.d_out, {bsz, len, dim}, io)
      d_fin = tensor(inputs.d_final, {bsz, dim, n}, io)

      {out, fin, ctx} = run_forward(ts, inputs)
      g = Scan.backward(ctx, d_out, d_final_state: d_fin)

      t1 = slice_all(ts, 0, split)
      t2 = slice_all(ts, split, len - split) |> Map.delete(:initial_state)
      {out1, fin1, ctx1} = run_forward(t1, inputs)
      {out2, fin2, ctx2} = run_forward(Map.put(t2, :initial_state, fin1), inputs)

      # the recurrence does the same operations on the same values: same bits
      assert bits(Tensor.concatenate([out1, out2], 1)) == bits(out), seed_note(seed)
      assert bits(fin2) == bits(fin), seed_note(seed)

      g2 = Scan.backward(ctx2, Tensor.slice(d_out, 1, split, len - split), d_final_state: d_fin)
      g1 = Scan.backward(ctx1, Tensor.slice(d_out, 1, 0, split), d_final_state: g2.initial_state)

      # per-step gradients: the same bits; sums over time: the same up to rounding
      for key <- [:u, :delta, :z, :b, :c] do
        joined = Tensor.concatenate([g1[key], g2[key]], 1)
        assert bits(joined) == bits(g[key]), "gradient of #{key} #{seed_note(seed)}"
      end

      assert bits(g1.initial_state) == bits(g.initial_state), seed_note(seed)
      tol = if io == {:f, 32}, do: 1.0e-5, else: 1.0e-12

      for key <- [:a, :d, :delta_bias] do
        sum = Mambex.Ops.add(g1[key], g2[key])
        e = rel_err(values(sum), values(g[key]))
        assert e <= tol, "gradient of #{key}: #{e} #{seed_note(seed)}"
      end
    end
  end

  test "a reset at t equals a fresh start at t, and stops the gradient there" do
    seed = seed_for("reset")
    {bsz, len, dim, n, _g} = dims = {2, 50, 40, 16, 2}
    t0 = 20
    inputs = make_inputs(seed, dims, d: true, z: true, delta_bias: true, initial_state: true)
    reset = for _b <- 1..bsz, t <- 0..(len - 1), do: if(t == t0, do: 1, else: 0)
    ts = Map.put(tensors(inputs, :cpu), :reset, tensor(reset, {bsz, len}, {:u, 8}))
    {out, fin, ctx} = run_forward(ts, inputs)

    # the suffix from t0 with a zero initial state
    suffix = slice_all(ts, t0, len - t0) |> Map.delete(:initial_state) |> Map.delete(:reset)
    {out_s, fin_s, ctx_s} = run_forward(suffix, inputs)
    assert bits(Tensor.slice(out, 1, t0, len - t0)) == bits(out_s), seed_note(seed)
    assert bits(fin) == bits(fin_s), seed_note(seed)

    # d_out only after the reset: nothing reaches the steps before it or h0
    d_list =
      for b <- 0..(bsz - 1), t <- 0..(len - 1), k <- 0..(dim - 1) do
        if t >= t0, do: Enum.at(inputs.d_out, (b * len + t) * dim + k), else: 0.0
      end

    d_out = tensor(d_list, {bsz, len, dim}, {:f, 32})
    d_fin = tensor(inputs.d_final, {bsz, dim, n}, {:f, 32})
    g = Scan.backward(ctx, d_out, d_final_state: d_fin)
    gs = Scan.backward(ctx_s, Tensor.slice(d_out, 1, t0, len - t0), d_final_state: d_fin)

    for key <- [:u, :delta, :z, :b, :c] do
      before = values(Tensor.slice(g[key], 1, 0, t0))

      assert Enum.all?(before, &(&1 == 0.0)),
             "gradient of #{key} before the reset #{seed_note(seed)}"

      assert bits(Tensor.slice(g[key], 1, t0, len - t0)) == bits(gs[key]),
             "#{key} #{seed_note(seed)}"
    end

    assert Enum.all?(values(g.initial_state), &(&1 == 0.0)), seed_note(seed)

    for key <- [:a, :d, :delta_bias] do
      assert rel_err(values(g[key]), values(gs[key])) <= 1.0e-6, "#{key} #{seed_note(seed)}"
    end

    # and with gradients everywhere the suffix part is still that of a fresh start
    g_all =
      Scan.backward(ctx, tensor(inputs.d_out, {bsz, len, dim}, {:f, 32}), d_final_state: d_fin)

    assert bits(Tensor.slice(g_all.u, 1, t0, len - t0)) == bits(gs.u), seed_note(seed)
  end

  # ---- determinism ------------------------------------------------------------

  defp run_all_bits(ts, inputs, d_out, d_fin) do
    {out, fin, ctx} = run_forward(ts, inputs)
    g = Scan.backward(ctx, d_out, d_final_state: d_fin)
    [bits(out), bits(fin) | g |> Enum.sort() |> Enum.map(fn {_k, t} -> bits(t) end)]
  end

  test "results are bit-identical from run to run, and under concurrent calls" do
    seed = seed_for("determinism")
    {bsz, len, dim, n, _g} = dims = {4, 61, 100, 16, 2}
    inputs = make_inputs(seed, dims, @all)
    ts = tensors(inputs, :cpu)
    d_out = tensor(inputs.d_out, {bsz, len, dim}, {:f, 32})
    d_fin = tensor(inputs.d_final, {bsz, dim, n}, {:f, 32})
    first = run_all_bits(ts, inputs, d_out, d_fin)

    for _ <- 1..3, do: assert(run_all_bits(ts, inputs, d_out, d_fin) == first, seed_note(seed))

    # concurrent callers find the pool busy and run on their own thread
    results =
      1..6
      |> Task.async_stream(fn _ -> run_all_bits(ts, inputs, d_out, d_fin) end,
        max_concurrency: 6,
        timeout: 120_000
      )
      |> Enum.map(fn {:ok, r} -> r end)

    assert Enum.all?(results, &(&1 == first)), seed_note(seed)
  end

  # ---- empty sizes ----------------------------------------------------------------

  test "L = 0 and batch = 0 give empty outputs; the state passes through" do
    {dim, n} = {8, 4}
    z3 = fn shape -> Tensor.zeros(shape) end
    a = tensor(Enum.map(1..(dim * n), &(-&1 / 10)), {dim, n}, {:f, 32})
    h0 = Tensor.random_uniform({2, dim, n}, seed: 3, min: -1.0, max: 1.0)

    {out, fin, ctx} =
      Scan.forward(z3.({2, 0, dim}), z3.({2, 0, dim}), a, z3.({2, 0, n}), z3.({2, 0, n}),
        initial_state: h0,
        d: Tensor.ones({dim})
      )

    assert out.shape == {2, 0, dim}
    assert bits(fin) == bits(h0)
    dfs = Tensor.random_uniform({2, dim, n}, seed: 4)
    g = Scan.backward(ctx, z3.({2, 0, dim}), d_final_state: dfs)
    assert bits(g.initial_state) == bits(dfs)
    assert Enum.all?(values(g.a), &(&1 == 0.0))
    assert Enum.all?(values(g.d), &(&1 == 0.0))
    assert g.u.shape == {2, 0, dim}

    {out, fin, ctx} =
      Scan.forward(z3.({0, 5, dim}), z3.({0, 5, dim}), a, z3.({0, 5, n}), z3.({0, 5, n}))

    assert out.shape == {0, 5, dim}
    assert fin.shape == {0, dim, n}
    g = Scan.backward(ctx, z3.({0, 5, dim}))
    assert Enum.all?(values(g.a), &(&1 == 0.0))
  end

  # ---- misuse ---------------------------------------------------------------------

  defp valid_args(dims \\ {2, 5, 8, 4, 2}) do
    inputs = make_inputs(7, dims, @all)
    ts = tensors(inputs, :cpu)
    {bsz, len, dim, n, _} = dims
    d_out = tensor(inputs.d_out, {bsz, len, dim}, {:f, 32})
    d_fin = tensor(inputs.d_final, {bsz, dim, n}, {:f, 32})
    {ts, d_out, d_fin}
  end

  defp nif_args(ts, d_out, d_fin) do
    [
      ts.u,
      ts.delta,
      ts.a,
      ts.b,
      ts.c,
      ts.d,
      ts.z,
      ts.delta_bias,
      true,
      ts.initial_state,
      ts.reset,
      d_out,
      d_fin
    ]
  end

  defp fwd(ts, over \\ []) do
    ts = Map.merge(ts, Map.new(over))

    Scan.forward(ts.u, ts.delta, ts.a, ts.b, ts.c,
      d: ts.d,
      z: ts.z,
      delta_bias: ts.delta_bias,
      initial_state: ts.initial_state,
      reset: ts.reset
    )
  end

  test "wrong shapes, types and sizes raise ArgumentError naming the argument" do
    {ts, d_out, d_fin} = valid_args()
    f32 = fn shape -> Tensor.random_uniform(shape, seed: 1, min: 0.1, max: 1.0) end
    f64 = fn shape -> Tensor.random_uniform(shape, seed: 1, type: {:f, 64}) end

    cases = [
      {[u: f32.({2, 5})], ~r/scan_forward: u must have shape/},
      {[u: Tensor.random_uniform({2, 5, 8}, seed: 1, type: {:s, 32})], ~r/u must have type/},
      {[delta: f32.({2, 5, 9})], ~r/delta must have the shape of u/},
      {[delta: f64.({2, 5, 8})], ~r/delta must have type/},
      {[a: f32.({8})], ~r/a must have shape/},
      {[a: f32.({9, 4})], ~r/a must have shape/},
      {[a: f64.({8, 4})], ~r/a must have type/},
      {[b: f32.({2, 5, 2, 5})], ~r/b must have shape/},
      {[b: f32.({2, 4, 2, 4})], ~r/b must have shape/},
      {[c: f32.({2, 5, 1, 4})], ~r/c must have the shape of b/},
      {[b: f32.({2, 5, 3, 4}), c: f32.({2, 5, 3, 4})], ~r/b: .*divisible/},
      {[d: f32.({7})], ~r/scan_forward: d must have shape/},
      {[z: f32.({2, 5, 7})], ~r/z must have the shape of u/},
      {[delta_bias: f32.({2, 8})], ~r/delta_bias must have shape/},
      {[delta_bias: f64.({8})], ~r/delta_bias must have type/},
      {[initial_state: f32.({2, 8, 5})], ~r/initial_state must have shape/},
      {[reset: f32.({2, 5})], ~r/reset must have type/},
      {[reset: Tensor.zeros({2, 6}, type: {:u, 8})], ~r/reset must have shape/}
    ]

    for {over, msg} <- cases do
      assert_raise ArgumentError, msg, fn -> fwd(ts, over) end
    end

    # N must be in 1..256
    a257 = f32.({8, 257})
    bc = f32.({2, 5, 2, 257})

    assert_raise ArgumentError, ~r/a: the number of states .* 1\.\.256, got: 257/, fn ->
      fwd(ts, a: a257, b: bc, c: bc, initial_state: nil)
    end

    # backward: d_out and d_final_state
    {_out, _fin, ctx} = fwd(ts)

    assert_raise ArgumentError, ~r/scan_backward: d_out must have the shape of u/, fn ->
      Scan.backward(ctx, f32.({2, 5, 9}))
    end

    assert_raise ArgumentError, ~r/d_out must have type/, fn ->
      Scan.backward(ctx, f64.({2, 5, 8}))
    end

    assert_raise ArgumentError, ~r/d_final_state must have shape/, fn ->
      Scan.backward(ctx, d_out, d_final_state: f32.({2, 8}))
    end

    assert_raise ArgumentError, ~r/d_final_state must be a Mambex.Tensor or nil/, fn ->
      Scan.backward(ctx, d_out, d_final_state: :zeros)
    end

    assert_raise ArgumentError, ~r/context must be a Mambex.Scan.Context/, fn ->
      Scan.backward(%{}, d_out)
    end

    assert_raise ArgumentError, ~r/softplus must be true or false/, fn ->
      Scan.forward(ts.u, ts.delta, ts.a, ts.b, ts.c, softplus: :yes)
    end

    assert_raise ArgumentError, ~r/unknown keys/, fn ->
      Scan.forward(ts.u, ts.delta, ts.a, ts.b, ts.c, gate: ts.z)
    end

    assert_raise ArgumentError, ~r/options must be a keyword list/, fn ->
      Scan.forward(ts.u, ts.delta, ts.a, ts.b, ts.c, :oops)
    end

    assert_raise ArgumentError, ~r/unknown keys/, fn ->
      Scan.backward(ctx, d_out, d_fin: d_fin)
    end
  end

  test "freed tensors raise ArgumentError naming the argument" do
    for key <- [:u, :delta, :a, :b, :c, :d, :z, :delta_bias, :initial_state, :reset] do
      {ts, _d_out, _d_fin} = valid_args()
      Tensor.free(ts[key])
      assert_raise ArgumentError, ~r/scan_forward: #{key} was freed/, fn -> fwd(ts) end
    end

    {ts, d_out, d_fin} = valid_args()
    {_out, _fin, ctx} = fwd(ts)
    Tensor.free(d_fin)

    assert_raise ArgumentError, ~r/scan_backward: d_final_state was freed/, fn ->
      Scan.backward(ctx, d_out, d_final_state: d_fin)
    end

    Tensor.free(d_out)

    assert_raise ArgumentError, ~r/scan_backward: d_out was freed/, fn ->
      Scan.backward(ctx, d_out)
    end

    Tensor.free(ts.c)

    assert_raise ArgumentError, ~r/scan_backward: c was freed/, fn ->
      Scan.backward(ctx, d_out)
    end
  end

  test "devices: absent CUDA devices are refused, and a context on one device only" do
    assert_raise ArgumentError, fn -> tensor([1.0, 2.0], {2}, {:f, 32}, {:cuda, 99}) end
    {ts, _d_out, _d_fin} = valid_args()

    # a device term where a tensor belongs
    assert_raise ArgumentError, ~r/u must be a Mambex.Tensor, got: {cuda,99}/, fn ->
      fwd(ts, u: {:cuda, 99})
    end

    assert_raise ArgumentError, ~r/d must be a Mambex.Tensor or nil/, fn ->
      fwd(ts, d: {:cuda, 99})
    end
  end

  @garbage [:foo, 1, 2.5, "bytes", [], [1], {}, {1, 2}, %{}, %{ref: :nope}, {:cuda, 99}, -1]

  test "garbage in every argument of both NIFs raises ArgumentError, never crashes" do
    {ts, d_out, d_fin} = valid_args()
    full = nif_args(ts, d_out, d_fin)
    bogus = %Tensor{ref: make_ref(), shape: {2, 5, 8}, type: {:f, 32}, device: :cpu}

    fwd_args = Enum.take(full, 11) ++ [true]
    bwd_args = full ++ [nil]

    for {args0, fun} <- [
          {fwd_args, &apply(Mambex.NIF, :scan_forward, &1)},
          {bwd_args, &apply(Mambex.NIF, :scan_backward, &1)}
        ],
        pos <- 0..(length(args0) - 1),
        junk <- [bogus, self() | @garbage] do
      args = List.replace_at(args0, pos, junk)
      assert_raise ArgumentError, fn -> fun.(args) end
    end

    # a checkpoint tensor that is not this call's is refused
    wrong = Tensor.fill({7}, 0.0)

    assert_raise ArgumentError, ~r/checkpoints do not belong/, fn ->
      apply(Mambex.NIF, :scan_backward, full ++ [wrong])
    end

    # and the valid calls still work afterwards
    assert {%Tensor{}, %Tensor{}, _checkpoints} = apply(Mambex.NIF, :scan_forward, fwd_args)
    assert %{u: %Tensor{}} = apply(Mambex.NIF, :scan_backward, bwd_args)
  end

  test "gradients come back for the given inputs only, in their shapes" do
    {ts, d_out, _} = valid_args({2, 5, 8, 4, 1})
    bc = Tensor.reshape(ts.b, {2, 5, 4})
    cc = Tensor.reshape(ts.c, {2, 5, 4})
    {_out, _fin, ctx} = Scan.forward(ts.u, ts.delta, ts.a, bc, cc)
    g = Scan.backward(ctx, d_out)
    assert Enum.sort(Map.keys(g)) == [:a, :b, :c, :delta, :u]
    assert g.b.shape == {2, 5, 4}
    assert g.a.shape == {8, 4}
    assert %Scan.Context{softplus: true, d: nil} = ctx
  end

  # ---- CUDA ---------------------------------------------------------------------

  describe "CUDA" do
    @describetag :cuda

    defp cuda, do: Mambex.TestHelpers.cuda_device()

    test "forward checkpoints give the gradients of re-running the forward, bit for bit" do
      dev = cuda()

      for {b, l, with_reset} <- [{3, 61, false}, {2, 40, true}] do
        d = 64
        n = 16

        r = fn shape, seed, opts ->
          Tensor.random_normal(shape, [seed: seed, device: dev] ++ opts)
        end

        u = r.({b, l, d}, 1, [])
        delta = r.({b, l, d}, 2, std: 0.5)
        a = Tensor.random_uniform({d, n}, seed: 3, device: dev, min: -2.0, max: -0.1)
        bm = r.({b, l, n}, 4, [])
        cm = r.({b, l, n}, 5, [])
        z = r.({b, l, d}, 6, [])
        d_out = r.({b, l, d}, 7, [])

        reset =
          if with_reset,
            do:
              Tensor.from_binary(
                for(i <- 1..(b * l), into: <<>>, do: <<if(rem(i, 13) == 0, do: 1, else: 0)>>),
                {:u, 8},
                shape: {b, l},
                device: dev
              ),
            else: nil

        opts = [
          z: z,
          d: r.({d}, 8, []),
          delta_bias: r.({d}, 9, []),
          initial_state: r.({b, d, n}, 10, [])
        ]

        opts = if reset, do: [{:reset, reset} | opts], else: opts
        {out1, fin1, ctx1} = Scan.forward(u, delta, a, bm, cm, [checkpoints: true] ++ opts)
        {out2, fin2, ctx2} = Scan.forward(u, delta, a, bm, cm, [checkpoints: false] ++ opts)
        # the CPU backend keeps none (MAMBEX_TEST_CUDA_AS_CPU runs this on :cpu)
        if dev == :cpu,
          do: assert(ctx1.checkpoints == nil),
          else: assert(%Tensor{} = ctx1.checkpoints)

        assert ctx2.checkpoints == nil
        assert Tensor.to_binary(out1) == Tensor.to_binary(out2)
        assert Tensor.to_binary(fin1) == Tensor.to_binary(fin2)
        g1 = Scan.backward(ctx1, d_out)
        g2 = Scan.backward(ctx2, d_out)

        for k <- Map.keys(g2) do
          assert Tensor.to_binary(g1[k]) == Tensor.to_binary(g2[k]), "gradient #{k} differs"
        end
      end
    end

    for {name, dims, opts} <- @cases do
      test "f32 io on {:cuda, 0} against the reference: #{name}" do
        check_reference(
          "cuda " <> unquote(name),
          unquote(Macro.escape(dims)),
          unquote(opts),
          cuda(),
          1.0e-5,
          1.0e-4
        )
      end
    end

    test "CPU and CUDA agree (f32)" do
      seed = seed_for("cpu vs cuda")
      {bsz, len, dim, n, _g} = dims = {3, 130, 100, 16, 2}
      inputs = make_inputs(seed, dims, @all)
      cpu = tensors(inputs, :cpu)
      gpu = tensors(inputs, cuda())
      d_out = tensor(inputs.d_out, {bsz, len, dim}, {:f, 32})
      d_fin = tensor(inputs.d_final, {bsz, dim, n}, {:f, 32})
      {out_c, fin_c, ctx_c} = run_forward(cpu, inputs)
      {out_g, fin_g, ctx_g} = run_forward(gpu, inputs)
      assert rel_err(values(out_g), values(out_c)) <= 1.0e-5, seed_note(seed)
      assert rel_err(values(fin_g), values(fin_c)) <= 1.0e-5, seed_note(seed)
      gc = Scan.backward(ctx_c, d_out, d_final_state: d_fin)

      gg =
        Scan.backward(ctx_g, Tensor.to_device(d_out, cuda()),
          d_final_state: Tensor.to_device(d_fin, cuda())
        )

      for {key, t} <- gc do
        e = rel_err(values(gg[key]), values(t))
        assert e <= 1.0e-4, "gradient of #{key}: #{e} #{seed_note(seed)}"
      end

      # bit-identical from run to run on the device too
      {out_g2, _, _} = run_forward(gpu, inputs)
      assert bits(out_g2) == bits(out_g)
    end

    test "bf16 io with f32 parameters against the reference (1e-2)" do
      # (f32 io in the CPU self-check mode: the CPU takes f32/f64 only)
      io = if cuda() == :cpu, do: {:f, 32}, else: {:bf, 16}
      opts = [io: io, param: {:f, 32}] ++ @all
      check_reference("cuda bf16", {2, 61, 64, 16, 2}, opts, cuda(), 1.0e-2, 1.0e-2)
    end

    test "tensors on two devices raise ArgumentError naming the argument" do
      if cuda() != :cpu do
        {ts, _d_out, _d_fin} = valid_args()
        dev = cuda()

        assert_raise ArgumentError, ~r/b is on {cuda,0} but u is on cpu/, fn ->
          fwd(ts, b: Tensor.to_device(ts.b, dev))
        end

        gpu = Map.new(ts, fn {k, t} -> {k, Tensor.to_device(t, dev)} end)

        assert_raise ArgumentError,
                     ~r/u must have type {:f, 32}, {:bf, 16} or {:f, 16} on CUDA/,
                     fn ->
                       fwd(gpu,
                         u: Tensor.random_uniform({2, 5, 8}, seed: 1, type: {:f, 64}, device: dev)
                       )
                     end

        assert_raise ArgumentError, ~r/a must have type/, fn ->
          fwd(gpu, a: Tensor.random_uniform({8, 4}, seed: 1, type: {:f, 64}, device: dev))
        end
      end
    end
  end
end

defmodule Mambex.ScanMemoryTest do
  # Live bytes and handles are global per device, so this module is
  # `async: false` (ExUnit runs it alone, after the async modules).
  use ExUnit.Case, async: false
  import Mambex.ScanTestHelpers

  alias Mambex.{Scan, Tensor}

  # 300 forward/backward pairs (checkpoints included), half the results freed
  # at once and half left to the garbage collector, plus a failing backward
  # each time: afterwards live bytes and handles are back where they were.
  defp scan_leak_check(device, {b, l, d, _n, _g} = dims) do
    inputs = make_inputs(seed_for("memory"), dims, io: {:f, 32}, d: true, z: true, reset: true)

    Mambex.TestHelpers.assert_no_leak(
      device,
      fn ->
        ts = tensors(inputs, device)
        d_out = tensor(inputs.d_out, {b, l, d}, {:f, 32}, device)
        bad = Tensor.zeros({b, l, d + 1}, device: device)

        for i <- 1..300 do
          {out, fin, ctx} = run_forward(ts, inputs)
          g = Scan.backward(ctx, d_out)
          if rem(i, 2) == 0, do: Enum.each([out, fin | Map.values(g)], &Tensor.free/1)

          try do
            Scan.backward(ctx, bad)
          rescue
            ArgumentError -> :ok
          end
        end

        :erlang.garbage_collect()
      end
    )
  end

  test "live bytes and handles return to their start after many scans, failed ones included" do
    scan_leak_check(:cpu, {2, 33, 40, 8, 2})
  end

  @tag :cuda
  test "on CUDA too, generic and N = 16 kernels (with checkpoints)" do
    dev = Mambex.TestHelpers.cuda_device()
    scan_leak_check(dev, {2, 33, 40, 8, 2})
    scan_leak_check(dev, {2, 33, 64, 16, 1})
  end
end

defmodule Mambex.ScanKernelsTest do
  # The three sets of N = 16 kernels on CUDA (4 lanes a channel, scan.cu; a
  # lane per state, and a lane per state with time split, scan_lps.cu), each
  # forced in turn with
  # MAMBEX_SCAN_KERNEL. The backend reads the variable on every call, so this
  # module is `async: false` (ExUnit runs it alone, after the async modules).
  use ExUnit.Case, async: false
  import Mambex.ScanTestHelpers

  alias Mambex.{Scan, Tensor}

  @moduletag :cuda
  @moduletag timeout: 600_000

  @all [d: true, z: true, delta_bias: true, initial_state: true, reset: true]

  # D / G a multiple of 32 (the N = 16 kernels' condition); odd lengths,
  # partial chunks and pieces, batch 1, groups, every option on and off;
  # (9, 9, 512) gives the lane-per-state forward 16 channels a block.
  @fast_cases [
    {"B2 L61 D64 all", {2, 61, 64, 16, 1}, @all},
    {"B1 L60 D64 G2 all", {1, 60, 64, 16, 2}, @all},
    {"B3 L17 D32 z only", {3, 17, 32, 16, 1}, [z: true]},
    {"B1 L1 D32 all", {1, 1, 32, 16, 1}, @all},
    {"B1 L150 D32 all", {1, 150, 32, 16, 1}, @all},
    {"B2 L40 D96 G3 no softplus", {2, 40, 96, 16, 3}, [softplus: false, d: true, reset: true]},
    {"B9 L9 D512 all", {9, 9, 512, 16, 1}, @all}
  ]

  defp cuda, do: Mambex.TestHelpers.cuda_device()

  defp with_kernel(kernel, fun) do
    System.put_env("MAMBEX_SCAN_KERNEL", kernel)

    try do
      fun.()
    after
      System.delete_env("MAMBEX_SCAN_KERNEL")
    end
  end

  for kernel <- ["split", "lps", "lane4"] do
    for {name, dims, opts} <- @fast_cases do
      test "#{kernel}: f32 io against the reference: #{name}" do
        with_kernel(unquote(kernel), fn ->
          check_reference(
            unquote(kernel) <> " " <> unquote(name),
            unquote(Macro.escape(dims)),
            unquote(opts),
            cuda(),
            1.0e-5,
            1.0e-4
          )
        end)
      end
    end

    test "#{kernel}: bf16 io against the reference (1e-2)" do
      io = if cuda() == :cpu, do: {:f, 32}, else: {:bf, 16}

      with_kernel(unquote(kernel), fn ->
        check_reference(
          unquote(kernel) <> " bf16",
          {2, 61, 64, 16, 2},
          [io: io, param: {:f, 32}] ++ @all,
          cuda(),
          1.0e-2,
          1.0e-2
        )
      end)
    end
  end

  test "checkpoints: the step-by-step forwards' agree bit for bit, the split one's within rounding; every backward gives the same bits from saved and recomputed ones" do
    dev = cuda()
    seed = seed_for("kernels checkpoints")
    {b, l, d, n, _} = dims = {3, 133, 64, 16, 1}
    inputs = make_inputs(seed, dims, @all)
    ts = tensors(inputs, dev)
    d_out = tensor(inputs.d_out, {b, l, d}, {:f, 32}, dev)
    d_fin = tensor(inputs.d_final, {b, d, n}, {:f, 32}, dev)
    bits = fn t -> Tensor.to_binary(t) end

    fwd = fn k, ckpt ->
      with_kernel(k, fn ->
        Scan.forward(
          ts.u,
          ts.delta,
          ts.a,
          ts.b,
          ts.c,
          [checkpoints: ckpt] ++ forward_opts(ts, inputs)
        )
      end)
    end

    bwd = fn k, ctx ->
      with_kernel(k, fn -> Scan.backward(ctx, d_out, d_final_state: d_fin) end)
    end

    grad_bits = fn g -> Map.new(g, fn {k, t} -> {k, bits.(t)} end) end
    close = fn x, y -> rel_err(values(x), values(y)) <= 1.0e-6 end

    {out_l, fin_l, ctx_l} = fwd.("lps", true)
    {out_4, fin_4, ctx_4} = fwd.("lane4", true)
    {out_s, fin_s, ctx_s} = fwd.("split", true)

    if dev != :cpu do
      assert bits.(ctx_l.checkpoints) == bits.(ctx_4.checkpoints), seed_note(seed)
      # the same states; the outputs summed over the states in another order
      assert bits.(fin_l) == bits.(fin_4), seed_note(seed)
      assert close.(out_l, out_4), seed_note(seed)
      assert close.(ctx_s.checkpoints, ctx_l.checkpoints), seed_note(seed)
      assert close.(fin_s, fin_l), seed_note(seed)
      assert close.(out_s, out_l), seed_note(seed)
    end

    ctxs = for k <- ["lps", "lane4", "split"], into: %{}, do: {k, elem(fwd.(k, false), 2)}

    for k <- ["lps", "lane4"] do
      g = grad_bits.(bwd.(k, ctx_l))

      assert grad_bits.(bwd.(k, ctx_4)) == g,
             "#{k} backward from the other forward's checkpoints #{seed_note(seed)}"

      assert grad_bits.(bwd.(k, ctxs["lps"])) == g,
             "#{k} backward recomputing its checkpoints #{seed_note(seed)}"

      assert grad_bits.(bwd.(k, ctxs["lane4"])) == g, seed_note(seed)
      # and run to run
      assert grad_bits.(bwd.(k, ctx_l)) == g, seed_note(seed)
    end

    g = bwd.("split", ctx_s)

    assert grad_bits.(bwd.("split", ctxs["split"])) == grad_bits.(g),
           "split recomputing #{seed_note(seed)}"

    assert grad_bits.(bwd.("split", ctx_s)) == grad_bits.(g), seed_note(seed)
    g_l = bwd.("lps", ctx_l)

    for {key, t} <- g do
      assert rel_err(values(t), values(g_l[key])) <= 1.0e-5,
             "split vs lps gradient of #{key} #{seed_note(seed)}"
    end
  end
end
