Code.require_file("support/conv1d_reference.exs", __DIR__)

defmodule Mambex.Conv1dTestHelpers do
  @moduledoc false
  # Inputs, tensors and comparisons for the conv1d tests. Every case derives
  # its seed from ExUnit's seed and its own name, and prints both on failure.

  alias Mambex.Tensor
  alias Mambex.TestHelpers, as: H

  def seed_for(name), do: :erlang.phash2({ExUnit.configuration()[:seed], name}, 1_073_741_824)

  def seed_note(seed), do: "(case seed #{seed}, ExUnit seed #{ExUnit.configuration()[:seed]})"

  defp uniform(rng, count, lo, hi) do
    Enum.map_reduce(1..count//1, rng, fn _, r ->
      {x, r} = :rand.uniform_s(r)
      # never exactly zero
      v = lo + (hi - lo) * x
      {if(v == 0.0, do: 0.125, else: v), r}
    end)
  end

  @doc """
  Random inputs for dims {batch, len, channels, width}. opts: :bias,
  :initial_state, :d_final (booleans), :silu, :io and :param types. Values
  are rounded to their types, so the reference sees what the kernel sees.
  """
  def make_inputs(seed, {bsz, len, ch, w} = dims, opts) do
    io = Keyword.get(opts, :io, {:f, 32})
    param = Keyword.get(opts, :param, io)
    rng = :rand.seed_s(:exsss, {seed, 0xC0, 17})
    blc = bsz * len * ch
    bck = bsz * ch * (w - 1)
    {x, rng} = uniform(rng, blc, -2.0, 2.0)
    {weight, rng} = uniform(rng, ch * w, -1.0, 1.0)
    {bias, rng} = uniform(rng, ch, -0.5, 0.5)
    {h0, rng} = uniform(rng, bck, -2.0, 2.0)
    {d_out, rng} = uniform(rng, blc, -1.0, 1.0)
    {d_final, _rng} = uniform(rng, bck, -1.0, 1.0)
    pick = fn key, val -> if Keyword.get(opts, key, false), do: val, else: nil end

    %{
      ref: %{
        dims: dims,
        silu: Keyword.get(opts, :silu, false),
        x: round_to(x, io),
        weight: round_to(weight, param),
        bias: pick.(:bias, round_to(bias, param)),
        initial_state: pick.(:initial_state, round_to(h0, param))
      },
      io: io,
      param: param,
      d_out: round_to(d_out, io),
      d_final: pick.(:d_final, round_to(d_final, param)),
      shapes: %{
        x: {bsz, len, ch},
        weight: {ch, w},
        bias: {ch},
        initial_state: {bsz, ch, w - 1}
      }
    }
  end

  def round_to(list, {:f, 64}), do: list
  def round_to(list, type), do: H.quantize_all(list, type)

  def type_of(inputs, :x), do: inputs.io
  def type_of(inputs, _), do: inputs.param

  @doc "Tensors of the inputs present, on a device."
  def tensors(inputs, device) do
    for key <- [:x, :weight, :bias, :initial_state], list = inputs.ref[key], list != nil,
        into: %{} do
      {key, H.make(list, type_of(inputs, key), inputs.shapes[key], device)}
    end
  end

  def d_out_tensor(inputs, device),
    do: H.make(inputs.d_out, inputs.io, inputs.shapes.x, device)

  def d_final_tensor(inputs, device) do
    if inputs.d_final,
      do: H.make(inputs.d_final, inputs.param, inputs.shapes.initial_state, device),
      else: nil
  end

  def run_forward(ts, silu) do
    Mambex.Conv1d.forward(ts.x, ts.weight,
      bias: ts[:bias],
      initial_state: ts[:initial_state],
      silu: silu
    )
  end

  def values(%Tensor{} = t), do: H.read(t)
  def bits(%Tensor{} = t), do: Tensor.to_binary(t)

  @doc "A copy of a tensor (new storage)."
  def copy(%Tensor{} = t),
    do: Tensor.from_binary(Tensor.to_binary(t), t.type, shape: t.shape, device: t.device)
end

defmodule Mambex.Conv1dTest do
  use ExUnit.Case, async: true
  import Mambex.Conv1dTestHelpers

  alias Mambex.Conv1dReference, as: Ref
  alias Mambex.{Conv1d, Ops, Tensor}
  alias Mambex.TestHelpers, as: H

  @moduletag timeout: 300_000

  @all [bias: true, initial_state: true, d_final: true]

  # {name, {batch, len, channels, width}, options}
  @cases [
    {"tiny W1", {1, 1, 1, 1}, [silu: true] ++ @all},
    {"W1 L61 C100", {2, 61, 100, 1}, [bias: true]},
    {"W2 L2", {3, 2, 5, 2}, [silu: true] ++ @all},
    {"W3 L1 state", {2, 1, 7, 3}, [initial_state: true, d_final: true]},
    {"W4 L61 C100 all", {2, 61, 100, 4}, [silu: true] ++ @all},
    {"W4 L61 C100 bare", {1, 61, 100, 4}, []},
    {"W4 C1 silu", {3, 61, 1, 4}, [silu: true, bias: true]},
    {"W4 L2 short state", {2, 2, 16, 4}, @all},
    {"W5 L61 C64 silu", {2, 61, 64, 5}, [silu: true, initial_state: true]},
    {"W8 L61 C100 all", {1, 61, 100, 8}, [silu: true] ++ @all},
    {"W8 L3 state", {2, 3, 12, 8}, @all},
    {"W7 L1 C1", {1, 1, 1, 7}, [silu: true] ++ @all},
    {"W6 d_final only", {2, 40, 24, 6}, [silu: true, d_final: true]},
    {"W4 batch 9 L130", {9, 130, 36, 4}, [silu: true, bias: true, initial_state: true]}
  ]

  # || got - want || / || magnitude of the terms ||
  defp terms_err(got, want, mag) do
    num = Enum.zip_reduce(got, want, 0.0, fn a, b, acc -> acc + (a - b) * (a - b) end)
    den = Enum.reduce(mag, 0.0, fn m, acc -> acc + m * m end)
    :math.sqrt(num / den)
  end

  def check_reference(name, dims, opts, device, fwd_tol, grad_tol) do
    seed = seed_for(name)
    inputs = make_inputs(seed, dims, opts)
    ts = tensors(inputs, device)
    silu = inputs.ref.silu
    {out, fin, ctx} = run_forward(ts, silu)
    ref = Ref.forward(inputs.ref)
    {bsz, len, ch, w} = dims
    assert out.shape == {bsz, len, ch}
    assert fin.shape == {bsz, ch, w - 1}
    assert out.type == inputs.io
    assert fin.type == inputs.param
    out_v = values(out)
    e = H.rel_err(out_v, ref.out)
    # An output whose terms nearly cancel (one output of 7 terms, "W7 L1
    # C1") can lose digits relative to itself however exact the kernel is:
    # it is then judged against the size of its terms instead (the fp32
    # rounding bound is proportional to that). Both measures use fwd_tol.
    ce = terms_err(out_v, ref.out, Ref.magnitude(inputs.ref))

    assert e <= fwd_tol or ce <= fwd_tol,
           "#{name}: out rel. error #{e} > #{fwd_tol} (to the terms: #{ce}) #{seed_note(seed)}"
    e = H.rel_err(values(fin), ref.final_state)
    assert e <= fwd_tol, "#{name}: final state rel. error #{e} #{seed_note(seed)}"

    d_out = d_out_tensor(inputs, device)
    grads = Conv1d.backward(ctx, d_out, d_final_state: d_final_tensor(inputs, device))
    rgrads = Ref.backward(inputs.ref, inputs.d_out, inputs.d_final)
    assert Enum.sort(Map.keys(grads)) == Enum.sort(Map.keys(rgrads))

    for {key, rg} <- rgrads do
      g = grads[key]
      assert g.shape == ts[key].shape, "#{name}: gradient of #{key} has shape #{inspect(g.shape)}"
      assert g.type == ts[key].type
      e = H.rel_err(values(g), rg)
      assert e <= grad_tol, "#{name}: gradient of #{key}: rel. error #{e} #{seed_note(seed)}"
    end

    {inputs, ts, grads}
  end

  describe "f32 on the CPU against the float64 reference" do
    for {name, dims, opts} <- @cases do
      test "#{name} #{inspect(dims)} #{inspect(opts)}" do
        check_reference(unquote(name), unquote(Macro.escape(dims)), unquote(opts), :cpu,
          1.0e-5, 1.0e-4)
      end
    end
  end

  describe "f64 on the CPU against the float64 reference" do
    for {name, dims, opts} <- [
          {"f64 W4 all", {2, 61, 100, 4}, [silu: true] ++ @all},
          {"f64 W8 bare", {1, 33, 24, 8}, []},
          {"f64 W3 state", {3, 2, 10, 3}, [initial_state: true, d_final: true]}
        ] do
      test "#{name}" do
        check_reference(unquote(name), unquote(Macro.escape(dims)),
          [io: {:f, 64}] ++ unquote(opts), :cpu, 1.0e-12, 1.0e-12)
      end
    end
  end

  test "a large call (threaded) matches the reference" do
    # B L C W = 4 * 200 * 96 * 4 multiply-adds: above the serial threshold
    check_reference("threaded", {4, 200, 96, 4}, [silu: true] ++ @all, :cpu, 1.0e-5, 1.0e-4)
  end

  # ---- finite differences (float64) ------------------------------------------

  @fd_keys [:x, :weight, :bias, :initial_state]

  # loss = Σ out·d_out + Σ final·d_final: d loss / d p is the backward's gradient
  defp loss(fwd, inputs) do
    a = Enum.zip_reduce(fwd.out, inputs.d_out, 0.0, fn o, d, s -> s + o * d end)
    b = Enum.zip_reduce(fwd.final_state, inputs.d_final, 0.0, fn o, d, s -> s + o * d end)
    a + b
  end

  defp finite_differences(inputs, forward_fun) do
    eps = 1.0e-6

    for key <- @fd_keys, inputs.ref[key] != nil, into: %{} do
      list = inputs.ref[key]

      grad =
        for i <- 0..(length(list) - 1)//1 do
          v = Enum.at(list, i)
          plus = put_in(inputs.ref[key], List.replace_at(list, i, v + eps))
          minus = put_in(inputs.ref[key], List.replace_at(list, i, v - eps))
          (loss(forward_fun.(plus), inputs) - loss(forward_fun.(minus), inputs)) / (2 * eps)
        end

      {key, grad}
    end
  end

  defp c_forward_f64(inputs) do
    {out, fin, _} = run_forward(tensors(inputs, :cpu), inputs.ref.silu)
    %{out: values(out), final_state: values(fin)}
  end

  for silu <- [true, false], w <- [1, 3, 4] do
    test "finite differences check the reference and the f64 CPU backward (silu: #{silu}, W #{w})" do
      silu = unquote(silu)
      name = "fd #{silu} #{unquote(w)}"
      seed = seed_for(name)
      dims = {2, 3, 3, unquote(w)}
      inputs = make_inputs(seed, dims, [io: {:f, 64}, silu: silu] ++ @all)
      fd = finite_differences(inputs, &Ref.forward(&1.ref))
      rg = Ref.backward(inputs.ref, inputs.d_out, inputs.d_final)
      {_out, _fin, ctx} = run_forward(tensors(inputs, :cpu), silu)

      cg =
        Conv1d.backward(ctx, d_out_tensor(inputs, :cpu),
          d_final_state: d_final_tensor(inputs, :cpu)
        )

      assert Enum.sort(Map.keys(fd)) == Enum.sort(Map.keys(rg))
      assert Enum.sort(Map.keys(fd)) == Enum.sort(Map.keys(cg))
      fd_c = finite_differences(inputs, &c_forward_f64/1)

      for {key, g} <- fd do
        e = H.rel_err(rg[key], g)
        assert e <= 1.0e-6, "reference gradient of #{key} vs FD: #{e} #{seed_note(seed)}"
        e = H.rel_err(values(cg[key]), fd_c[key])
        assert e <= 1.0e-6, "CPU f64 gradient of #{key} vs FD: #{e} #{seed_note(seed)}"
      end
    end
  end

  # ---- split sequences ----------------------------------------------------------

  defp split_check(device, io, dims, split, grad_tol) do
    {bsz, len, ch, w} = dims
    seed = seed_for("split #{inspect(device)} #{inspect(io)} #{split} #{w}")
    param = if device == :cpu, do: io, else: {:f, 32}
    inputs = make_inputs(seed, dims, [io: io, param: param, silu: true] ++ @all)
    ts = tensors(inputs, device)
    d_out = d_out_tensor(inputs, device)
    d_fin = d_final_tensor(inputs, device)
    {out, fin, ctx} = run_forward(ts, true)
    g = Conv1d.backward(ctx, d_out, d_final_state: d_fin)

    x1 = Tensor.slice(ts.x, 1, 0, split)
    x2 = Tensor.slice(ts.x, 1, split, len - split)
    {out1, fin1, ctx1} = run_forward(%{ts | x: x1}, true)
    {out2, fin2, ctx2} = run_forward(%{ts | x: x2, initial_state: fin1}, true)
    assert fin1.shape == {bsz, ch, w - 1}
    # same operations on the same values: the same bits
    assert bits(Tensor.concatenate([out1, out2], 1)) == bits(out), seed_note(seed)
    assert bits(fin2) == bits(fin), seed_note(seed)

    g2 = Conv1d.backward(ctx2, Tensor.slice(d_out, 1, split, len - split), d_final_state: d_fin)
    g1 = Conv1d.backward(ctx1, Tensor.slice(d_out, 1, 0, split), d_final_state: g2.initial_state)
    dx = Tensor.concatenate([g1.x, g2.x], 1)
    e = H.rel_err(values(dx), values(g.x))
    assert e <= grad_tol, "dx: #{e} #{seed_note(seed)}"
    e = H.rel_err(values(g1.initial_state), values(g.initial_state))
    assert e <= grad_tol, "initial state: #{e} #{seed_note(seed)}"

    for key <- [:weight, :bias] do
      e = H.rel_err(values(Ops.add(g1[key], g2[key])), values(g[key]))
      assert e <= grad_tol, "gradient of #{key}: #{e} #{seed_note(seed)}"
    end
  end

  for {io, split, w} <- [{{:f, 32}, 30, 4}, {{:f, 32}, 1, 4}, {{:f, 32}, 2, 8}, {{:f, 64}, 45, 3}] do
    test "a split sequence gives the outputs and gradients of one call (#{inspect(io)}, split #{split}, W #{w})" do
      io = unquote(Macro.escape(io))
      tol = if io == {:f, 64}, do: 1.0e-13, else: 1.0e-6
      split_check(:cpu, io, {2, 61, 24, unquote(w)}, unquote(split), tol)
    end
  end

  test "W = 1: the state is empty and the call is pointwise" do
    inputs = make_inputs(seed_for("w1"), {2, 5, 3, 1}, bias: true, initial_state: true)
    ts = tensors(inputs, :cpu)
    {out, fin, ctx} = run_forward(ts, false)
    assert fin.shape == {2, 3, 0}
    [w0, w1, w2] = inputs.ref.weight
    [b0, b1, b2] = inputs.ref.bias

    expected =
      inputs.ref.x
      |> Enum.chunk_every(3)
      |> Enum.flat_map(fn [a, b, c] -> [b0 + w0 * a, b1 + w1 * b, b2 + w2 * c] end)

    assert H.rel_err(values(out), expected) <= 1.0e-6
    g = Conv1d.backward(ctx, d_out_tensor(inputs, :cpu))
    assert g.initial_state.shape == {2, 3, 0}
  end

  # ---- accumulation -----------------------------------------------------------------

  defp into_check(device, io) do
    param = if device == :cpu, do: io, else: {:f, 32}
    seed = seed_for("into #{inspect(device)}")
    dims = {3, 17, 20, 4}
    i1 = make_inputs(seed, dims, [io: io, param: param, silu: true] ++ @all)
    i2 = make_inputs(seed + 1, dims, [io: io, param: param, silu: true] ++ @all)
    t1 = tensors(i1, device)
    # the second micro-batch shares the parameters, with its own x and state
    t2 = %{tensors(i2, device) | weight: t1.weight, bias: t1.bias}
    {_, _, c1} = run_forward(t1, true)
    {_, _, c2} = run_forward(t2, true)
    g1 = Conv1d.backward(c1, d_out_tensor(i1, device), d_final_state: d_final_tensor(i1, device))
    g2 = Conv1d.backward(c2, d_out_tensor(i2, device), d_final_state: d_final_tensor(i2, device))
    into = %{weight: copy(g1.weight), bias: copy(g1.bias), initial_state: copy(g1.initial_state)}

    ga =
      Conv1d.backward(c2, d_out_tensor(i2, device),
        d_final_state: d_final_tensor(i2, device),
        into: into
      )

    for key <- [:weight, :bias, :initial_state] do
      # the very tensors given, added to in place
      assert ga[key].ref == into[key].ref
      assert bits(ga[key]) == bits(Ops.add(g1[key], g2[key])), "#{key} #{seed_note(seed)}"
    end

    assert bits(ga.x) == bits(g2.x)
  end

  test "into: accumulates the parameter gradients in place (sum of two calls)" do
    into_check(:cpu, {:f, 32})
    into_check(:cpu, {:f, 64})
  end

  test "into: only the wanted keys, tensors of the right shape" do
    inputs = make_inputs(seed_for("into keys"), {2, 5, 8, 4}, bias: true)
    ts = tensors(inputs, :cpu)
    {_, _, ctx} = run_forward(ts, false)
    d_out = d_out_tensor(inputs, :cpu)
    w = Tensor.zeros({8, 4})
    b = Tensor.zeros({8})

    assert_raise ArgumentError, ~r/into must hold exactly the keys \[:weight, :bias\]/, fn ->
      Conv1d.backward(ctx, d_out, into: %{weight: w})
    end

    assert_raise ArgumentError, ~r/into must hold exactly the keys/, fn ->
      Conv1d.backward(ctx, d_out, into: %{weight: w, bias: b, initial_state: b})
    end

    assert_raise ArgumentError, ~r/into must be a map/, fn ->
      Conv1d.backward(ctx, d_out, into: [weight: w])
    end

    assert_raise ArgumentError, ~r/into.weight must be a Mambex.Tensor/, fn ->
      Conv1d.backward(ctx, d_out, into: %{weight: nil, bias: b})
    end

    assert_raise ArgumentError, ~r/into.weight must have the shape of weight/, fn ->
      Conv1d.backward(ctx, d_out, into: %{weight: Tensor.zeros({8, 3}), bias: b})
    end

    assert_raise ArgumentError, ~r/into.bias must have shape \{8\}/, fn ->
      Conv1d.backward(ctx, d_out, into: %{weight: w, bias: Tensor.zeros({9})})
    end

    assert_raise ArgumentError, ~r/into.bias must have type \{f,32\}/, fn ->
      Conv1d.backward(ctx, d_out, into: %{weight: w, bias: Tensor.zeros({8}, type: {:f, 64})})
    end

    assert_raise ArgumentError, ~r/into.weight must not share memory with weight/, fn ->
      Conv1d.backward(ctx, d_out, into: %{weight: ts.weight, bias: b})
    end

    Tensor.free(b)

    assert_raise ArgumentError, ~r/into.bias was freed/, fn ->
      Conv1d.backward(ctx, d_out, into: %{weight: w, bias: b})
    end

    # nothing was written to w by the failed calls
    assert Enum.all?(values(w), &(&1 == 0.0))
  end

  # ---- determinism --------------------------------------------------------------------

  defp run_all_bits(ts, d_out, d_fin) do
    {out, fin, ctx} = run_forward(ts, true)
    g = Conv1d.backward(ctx, d_out, d_final_state: d_fin)
    [bits(out), bits(fin) | g |> Enum.sort() |> Enum.map(fn {_k, t} -> bits(t) end)]
  end

  test "results are bit-identical from run to run, and under concurrent calls" do
    inputs = make_inputs(seed_for("determinism"), {5, 150, 100, 4}, [silu: true] ++ @all)
    ts = tensors(inputs, :cpu)
    d_out = d_out_tensor(inputs, :cpu)
    d_fin = d_final_tensor(inputs, :cpu)
    first = run_all_bits(ts, d_out, d_fin)
    for _ <- 1..3, do: assert(run_all_bits(ts, d_out, d_fin) == first)

    results =
      1..6
      |> Task.async_stream(fn _ -> run_all_bits(ts, d_out, d_fin) end,
        max_concurrency: 6,
        timeout: 120_000
      )
      |> Enum.map(fn {:ok, r} -> r end)

    assert Enum.all?(results, &(&1 == first))
  end

  # ---- empty sizes -------------------------------------------------------------------

  test "L = 0, batch = 0 and channels = 0 give empty outputs; the state passes through" do
    w = Tensor.random_uniform({6, 4}, seed: 1, min: -1.0, max: 1.0)
    h0 = Tensor.random_uniform({2, 6, 3}, seed: 2, min: -1.0, max: 1.0)
    {out, fin, ctx} = Conv1d.forward(Tensor.zeros({2, 0, 6}), w, initial_state: h0, silu: true)
    assert out.shape == {2, 0, 6}
    assert bits(fin) == bits(h0)
    dfs = Tensor.random_uniform({2, 6, 3}, seed: 4, min: -1.0, max: 1.0)
    g = Conv1d.backward(ctx, Tensor.zeros({2, 0, 6}), d_final_state: dfs)
    assert bits(g.initial_state) == bits(dfs)
    assert Enum.all?(values(g.weight), &(&1 == 0.0))
    assert g.x.shape == {2, 0, 6}

    # without an initial state the final state is zeros
    {_out, fin, _} = Conv1d.forward(Tensor.zeros({2, 0, 6}), w)
    assert Enum.all?(values(fin), &(&1 == 0.0))

    # accumulating over nothing leaves the targets alone (dh0 gets d_final_state)
    into = %{weight: Tensor.ones({6, 4}), initial_state: Tensor.ones({2, 6, 3})}
    g = Conv1d.backward(ctx, Tensor.zeros({2, 0, 6}), d_final_state: dfs, into: into)
    assert Enum.all?(values(g.weight), &(&1 == 1.0))
    assert H.rel_err(values(g.initial_state), Enum.map(values(dfs), &(&1 + 1.0))) <= 1.0e-7

    {out, fin, ctx} = Conv1d.forward(Tensor.zeros({0, 5, 6}), w, bias: Tensor.ones({6}))
    assert out.shape == {0, 5, 6}
    assert fin.shape == {0, 6, 3}
    g = Conv1d.backward(ctx, Tensor.zeros({0, 5, 6}))
    assert Enum.all?(values(g.weight), &(&1 == 0.0))
    assert Enum.all?(values(g.bias), &(&1 == 0.0))

    {out, _fin, ctx} = Conv1d.forward(Tensor.zeros({2, 5, 0}), Tensor.zeros({0, 4}))
    assert out.shape == {2, 5, 0}
    assert Conv1d.backward(ctx, Tensor.zeros({2, 5, 0})).weight.shape == {0, 4}
  end

  # ---- misuse ------------------------------------------------------------------------

  defp valid(dims \\ {2, 5, 8, 4}) do
    inputs = make_inputs(7, dims, [silu: true] ++ @all)
    {tensors(inputs, :cpu), d_out_tensor(inputs, :cpu), d_final_tensor(inputs, :cpu)}
  end

  defp fwd(ts, over \\ []) do
    ts = Map.merge(ts, Map.new(over))
    Conv1d.forward(ts.x, ts.weight, bias: ts[:bias], initial_state: ts[:initial_state])
  end

  test "a width outside 1..8 is refused with a clear message" do
    x = Tensor.zeros({2, 5, 8})

    assert_raise ArgumentError,
                 ~r/conv1d_forward: weight: the kernel width W \(weight's second axis\) must be in 1\.\.8, got: 0/,
                 fn -> Conv1d.forward(x, Tensor.zeros({8, 0})) end

    assert_raise ArgumentError, ~r/must be in 1\.\.8, got: 9/, fn ->
      Conv1d.forward(x, Tensor.zeros({8, 9}))
    end
  end

  test "wrong shapes and types raise ArgumentError naming the argument" do
    {ts, d_out, d_fin} = valid()
    f32 = fn shape -> Tensor.random_uniform(shape, seed: 1, min: 0.1, max: 1.0) end
    f64 = fn shape -> Tensor.random_uniform(shape, seed: 1, type: {:f, 64}) end

    cases = [
      {[x: f32.({2, 5})], ~r/conv1d_forward: x must have shape \{batch, length, channels\}/},
      {[x: Tensor.zeros({2, 5, 8}, type: {:s, 32})], ~r/x must have type \{:f, 32\} or \{:f, 64\}/},
      {[x: Tensor.zeros({2, 5, 8}, type: {:bf, 16})], ~r/x must have type/},
      {[weight: f32.({8})], ~r/weight must have shape \{channels, width\} = \{8, W\}/},
      {[weight: f32.({9, 4})], ~r/weight must have shape/},
      {[weight: f64.({8, 4})], ~r/weight must have type \{f,32\} \(the parameter type\)/},
      {[bias: f32.({7})], ~r/bias must have shape \{8\}/},
      {[bias: f64.({8})], ~r/bias must have type/},
      {[initial_state: f32.({2, 8, 4})], ~r/initial_state must have shape \{batch, channels, width - 1\}/},
      {[initial_state: f32.({1, 8, 3})], ~r/initial_state must have shape/},
      {[initial_state: f64.({2, 8, 3})], ~r/initial_state must have type/}
    ]

    for {over, msg} <- cases do
      assert_raise ArgumentError, msg, fn -> fwd(ts, over) end
    end

    {_out, _fin, ctx} = fwd(ts)

    assert_raise ArgumentError, ~r/conv1d_backward: d_out must have the shape of x/, fn ->
      Conv1d.backward(ctx, f32.({2, 5, 9}))
    end

    assert_raise ArgumentError, ~r/d_out must have type \{f,32\} \(the type of x\)/, fn ->
      Conv1d.backward(ctx, f64.({2, 5, 8}))
    end

    assert_raise ArgumentError, ~r/d_final_state must have shape/, fn ->
      Conv1d.backward(ctx, d_out, d_final_state: f32.({2, 8}))
    end

    assert_raise ArgumentError, ~r/d_final_state must be a Mambex.Tensor or nil/, fn ->
      Conv1d.backward(ctx, d_out, d_final_state: :zeros)
    end

    assert_raise ArgumentError, ~r/context must be a Mambex.Conv1d.Context/, fn ->
      Conv1d.backward(%{}, d_out)
    end

    assert_raise ArgumentError, ~r/silu must be true or false/, fn ->
      Conv1d.forward(ts.x, ts.weight, silu: :yes)
    end

    assert_raise ArgumentError, ~r/unknown keys/, fn ->
      Conv1d.forward(ts.x, ts.weight, activation: :silu)
    end

    assert_raise ArgumentError, ~r/options must be a keyword list/, fn ->
      Conv1d.forward(ts.x, ts.weight, :oops)
    end

    assert_raise ArgumentError, ~r/unknown keys/, fn ->
      Conv1d.backward(ctx, d_out, d_fin: d_fin)
    end
  end

  test "freed tensors raise ArgumentError naming the argument" do
    for key <- [:x, :weight, :bias, :initial_state] do
      {ts, _d_out, _d_fin} = valid()
      Tensor.free(ts[key])
      assert_raise ArgumentError, ~r/conv1d_forward: #{key} was freed/, fn -> fwd(ts) end
    end

    {ts, d_out, d_fin} = valid()
    {_out, _fin, ctx} = fwd(ts)
    Tensor.free(d_fin)

    assert_raise ArgumentError, ~r/conv1d_backward: d_final_state was freed/, fn ->
      Conv1d.backward(ctx, d_out, d_final_state: d_fin)
    end

    Tensor.free(d_out)
    assert_raise ArgumentError, ~r/conv1d_backward: d_out was freed/, fn -> Conv1d.backward(ctx, d_out) end
    Tensor.free(ts.x)
    assert_raise ArgumentError, ~r/conv1d_backward: x was freed/, fn -> Conv1d.backward(ctx, d_out) end
  end

  @garbage [:foo, 1, 2.5, "bytes", [], [1], {}, {1, 2}, %{}, %{ref: :nope}, {:cuda, 99}, -1]

  test "garbage in every argument of both NIFs raises ArgumentError, never crashes" do
    {ts, d_out, d_fin} = valid()
    bogus = %Tensor{ref: make_ref(), shape: {2, 5, 8}, type: {:f, 32}, device: :cpu}
    fwd_args = [ts.x, ts.weight, ts.bias, ts.initial_state, true]

    bwd_args =
      fwd_args ++
        [d_out, d_fin, Tensor.zeros({8, 4}), Tensor.zeros({8}), Tensor.zeros({2, 8, 3})]

    for {args0, fun} <- [
          {fwd_args, &apply(Mambex.NIF, :conv1d_forward, &1)},
          {bwd_args, &apply(Mambex.NIF, :conv1d_backward, &1)}
        ],
        pos <- 0..(length(args0) - 1),
        junk <- [bogus, self() | @garbage] do
      args = List.replace_at(args0, pos, junk)
      assert H.arg_error_outcome(fn -> fun.(args) end) == nil, "position #{pos}: #{inspect(junk)}"
    end

    assert {%Tensor{}, %Tensor{}} = apply(Mambex.NIF, :conv1d_forward, fwd_args)
    assert %{x: %Tensor{}, weight: %Tensor{}} = apply(Mambex.NIF, :conv1d_backward, bwd_args)
  end

  test "absent devices are refused" do
    {ts, _d_out, _d_fin} = valid()

    assert_raise ArgumentError, ~r/x must be a Mambex.Tensor, got: \{cuda,99\}/, fn ->
      fwd(ts, x: {:cuda, 99})
    end

    assert_raise ArgumentError, ~r/bias must be a Mambex.Tensor or nil/, fn ->
      fwd(ts, bias: {:cuda, 99})
    end
  end

  test "gradients come back for the given inputs only, and the context keeps the inputs" do
    {ts, d_out, _} = valid()
    {_out, _fin, ctx} = Conv1d.forward(ts.x, ts.weight)
    assert %Conv1d.Context{silu: false, bias: nil, initial_state: nil} = ctx
    g = Conv1d.backward(ctx, d_out)
    assert Enum.sort(Map.keys(g)) == [:weight, :x]
    assert g.weight.shape == {8, 4}
  end

  # ---- CUDA --------------------------------------------------------------------------

  describe "CUDA" do
    @describetag :cuda

    defp cuda, do: H.cuda_device()

    for {name, dims, opts} <- @cases do
      test "f32 io on CUDA against the reference: #{name}" do
        check_reference("cuda " <> unquote(name), unquote(Macro.escape(dims)), unquote(opts),
          cuda(), 1.0e-5, 1.0e-4)
      end
    end

    test "f32 io, C a multiple of 4 (vector path), all widths" do
      for w <- 1..8 do
        check_reference("cuda vec W#{w}", {3, 37, 64, w}, [silu: rem(w, 2) == 0] ++ @all,
          cuda(), 1.0e-5, 1.0e-4)
      end
    end

    test "CPU and CUDA agree (f32), and CUDA reruns are bit-identical" do
      for {dims, name} <- [{{4, 61, 100, 4}, "agree odd"}, {{5, 64, 128, 4}, "agree vec"}] do
        seed = seed_for(name)
        inputs = make_inputs(seed, dims, [silu: true] ++ @all)
        cpu = tensors(inputs, :cpu)
        gpu = tensors(inputs, cuda())
        {out_c, fin_c, ctx_c} = run_forward(cpu, true)
        {out_g, fin_g, ctx_g} = run_forward(gpu, true)
        assert H.rel_err(values(out_g), values(out_c)) <= 1.0e-5, seed_note(seed)
        assert H.rel_err(values(fin_g), values(fin_c)) <= 1.0e-5, seed_note(seed)
        gc = Conv1d.backward(ctx_c, d_out_tensor(inputs, :cpu), d_final_state: d_final_tensor(inputs, :cpu))

        run = fn ->
          Conv1d.backward(ctx_g, d_out_tensor(inputs, cuda()),
            d_final_state: d_final_tensor(inputs, cuda())
          )
        end

        gg = run.()

        for {key, t} <- gc do
          e = H.rel_err(values(gg[key]), values(t))
          assert e <= 1.0e-4, "gradient of #{key}: #{e} #{seed_note(seed)}"
        end

        gg2 = run.()
        for {key, t} <- gg, do: assert(bits(gg2[key]) == bits(t), "#{key} rerun differs")
        {out_g2, _, _} = run_forward(gpu, true)
        assert bits(out_g2) == bits(out_g)
      end
    end

    test "bf16 io with f32 parameters against the reference (1e-2)" do
      io = if cuda() == :cpu, do: {:f, 32}, else: {:bf, 16}

      for {dims, name} <- [{{2, 61, 64, 4}, "bf16 vec"}, {{2, 61, 30, 3}, "bf16 odd"}] do
        check_reference("cuda " <> name, dims, [io: io, param: {:f, 32}, silu: true] ++ @all,
          cuda(), 1.0e-2, 1.0e-2)
      end
    end

    test "a split sequence gives the outputs and gradients of one call" do
      split_check(cuda(), {:f, 32}, {2, 61, 24, 4}, 30, 1.0e-6)
      split_check(cuda(), {:f, 32}, {2, 61, 64, 4}, 1, 1.0e-6)
    end

    test "into accumulates on CUDA" do
      into_check(cuda(), {:f, 32})
    end

    test "a large batch (many tiles and reduce groups) matches the CPU" do
      seed = seed_for("cuda large")
      inputs = make_inputs(seed, {64, 100, 64, 4}, [silu: true] ++ @all)
      {out_c, _, ctx_c} = run_forward(tensors(inputs, :cpu), true)
      {out_g, _, ctx_g} = run_forward(tensors(inputs, cuda()), true)
      assert H.rel_err(values(out_g), values(out_c)) <= 1.0e-5
      gc = Conv1d.backward(ctx_c, d_out_tensor(inputs, :cpu), d_final_state: d_final_tensor(inputs, :cpu))
      gg = Conv1d.backward(ctx_g, d_out_tensor(inputs, cuda()), d_final_state: d_final_tensor(inputs, cuda()))

      for {key, t} <- gc do
        assert H.rel_err(values(gg[key]), values(t)) <= 1.0e-4, "#{key} #{seed_note(seed)}"
      end
    end

    test "empty sizes on CUDA" do
      dev = cuda()
      w = Tensor.random_uniform({6, 4}, seed: 1, min: -1.0, max: 1.0, device: dev)
      h0 = Tensor.random_uniform({2, 6, 3}, seed: 2, min: -1.0, max: 1.0, device: dev)
      {_out, fin, ctx} = Conv1d.forward(Tensor.zeros({2, 0, 6}, device: dev), w, initial_state: h0)
      assert bits(fin) == bits(h0)
      dfs = Tensor.random_uniform({2, 6, 3}, seed: 4, min: -1.0, max: 1.0, device: dev)
      g = Conv1d.backward(ctx, Tensor.zeros({2, 0, 6}, device: dev), d_final_state: dfs)
      assert bits(g.initial_state) == bits(dfs)
      assert Enum.all?(values(g.weight), &(&1 == 0.0))
      {out, _fin, ctx} = Conv1d.forward(Tensor.zeros({0, 5, 6}, device: dev), w)
      assert out.shape == {0, 5, 6}
      assert Enum.all?(values(Conv1d.backward(ctx, Tensor.zeros({0, 5, 6}, device: dev)).weight), &(&1 == 0.0))
    end

    test "tensors on two devices and CUDA dtypes raise ArgumentError naming the argument" do
      if cuda() != :cpu do
        dev = cuda()
        {ts, _d_out, _d_fin} = valid()

        assert_raise ArgumentError, ~r/weight is on \{cuda,0\} but x is on cpu/, fn ->
          fwd(ts, weight: Tensor.to_device(ts.weight, dev))
        end

        gpu = Map.new(ts, fn {k, t} -> {k, Tensor.to_device(t, dev)} end)

        assert_raise ArgumentError, ~r/x must have type \{:f, 32\} or \{:bf, 16\} on CUDA/, fn ->
          fwd(gpu, x: Tensor.zeros({2, 5, 8}, type: {:f, 64}, device: dev))
        end

        assert_raise ArgumentError, ~r/weight must have type \{f,32\}/, fn ->
          fwd(gpu, x: Tensor.zeros({2, 5, 8}, type: {:bf, 16}, device: dev),
            weight: Tensor.zeros({8, 4}, type: {:bf, 16}, device: dev))
        end
      end
    end
  end
end

defmodule Mambex.Conv1dMemoryTest do
  # Live bytes and handles are global per device: async: false.
  use ExUnit.Case, async: false
  import Mambex.Conv1dTestHelpers

  alias Mambex.{Conv1d, Tensor}

  defp leak_check(device) do
    inputs = make_inputs(seed_for("memory"), {2, 33, 40, 4}, silu: true, bias: true,
      initial_state: true, d_final: true)
    Mambex.TestHelpers.assert_no_leak(
      device,
      fn ->
        ts = tensors(inputs, device)
        d_out = d_out_tensor(inputs, device)
        d_fin = d_final_tensor(inputs, device)
        bad = Tensor.zeros({2, 33, 41}, device: device)
        into = %{weight: Tensor.zeros({40, 4}, device: device), bias: Tensor.zeros({40}, device: device),
                 initial_state: Tensor.zeros({2, 40, 3}, device: device)}

        for i <- 1..300 do
          {out, fin, ctx} = run_forward(ts, true)
          g = Conv1d.backward(ctx, d_out, d_final_state: d_fin)
          _ = Conv1d.backward(ctx, d_out, d_final_state: d_fin, into: into)
          if rem(i, 2) == 0, do: Enum.each([out, fin | Map.values(g)], &Tensor.free/1)

          try do
            Conv1d.backward(ctx, bad)
          rescue
            ArgumentError -> :ok
          end
        end

        :erlang.garbage_collect()
      end
    )
  end

  test "live bytes and handles return to their start after many conv1d calls" do
    leak_check(:cpu)
  end

  @tag :cuda
  test "on CUDA too" do
    leak_check(Mambex.TestHelpers.cuda_device())
  end
end
