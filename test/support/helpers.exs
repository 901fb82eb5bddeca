defmodule Mambex.TestHelpers do
  @moduledoc """
  Hand-written references for the Mambex tests: Nx-format encoders and
  decoders written with bit syntax, float64 / exact-integer references of
  every op, seeded random inputs and tolerance checks. Nothing here calls the
  library except `make/4` and `read/1`, so a reference never checks the
  optimised code against itself.
  """

  import ExUnit.Assertions
  import Bitwise

  alias Mambex.Tensor

  @float_types [{:f, 32}, {:f, 64}, {:bf, 16}, {:f, 16}]
  @int_types [{:s, 32}, {:s, 64}, {:u, 8}]

  def float_types, do: @float_types
  def int_types, do: @int_types
  def all_types, do: @float_types ++ @int_types

  def float?({k, _}), do: k in [:f, :bf]

  # ---- devices ------------------------------------------------------------

  @doc "The device the :cuda tests use (see test_helper.exs for the self-check switch)."
  def cuda_device do
    if System.get_env("MAMBEX_TEST_CUDA_AS_CPU") == "1", do: :cpu, else: {:cuda, 0}
  end

  @doc "{label, device, extra tags} for the per-device describe blocks."
  def device_matrix, do: [{"cpu", :cpu, []}, {"cuda", cuda_device(), [cuda: true]}]

  # ---- seeds ----------------------------------------------------------------

  @doc "The run's seed (ExUnit's), from which every input seed derives."
  def base_seed, do: ExUnit.configuration()[:seed] || 0

  @doc "Seeds :rand in the calling process from the run seed, the module and the test."
  def seed_rand(%{module: module, test: test}), do: seed_rand({module, test})

  def seed_rand(term) do
    :rand.seed(:exsss, {base_seed() + 1, :erlang.phash2(term) + 1, :erlang.phash2({term, 7}) + 1})
    :ok
  end

  # ---- Nx-format encoding by hand -------------------------------------------

  @doc "The bits of the bf16 nearest (ties to even) to the f32 nearest to x."
  def bf16_bits(x) do
    <<u::32>> = <<x::float-32>>
    # round to nearest even on the low 16 bits
    band(bsr(u + 0x7FFF + band(bsr(u, 16), 1), 16), 0xFFFF)
  end

  def encode(values, type), do: for(x <- values, into: <<>>, do: encode1(x, type))

  def encode1(x, {:f, 32}), do: <<x::float-32-native>>
  def encode1(x, {:f, 64}), do: <<x::float-64-native>>
  def encode1(x, {:f, 16}), do: <<x::float-16-native>>
  def encode1(x, {:bf, 16}), do: <<bf16_bits(x)::16-native>>
  def encode1(x, {:s, 32}), do: <<x::signed-32-native>>
  def encode1(x, {:s, 64}), do: <<x::signed-64-native>>
  def encode1(x, {:u, 8}), do: <<x::unsigned-8>>

  @doc "Decodes Nx-format bytes; non-finite floats become :nan, :infinity, :neg_infinity."
  def decode(bin, {_, bits} = type) do
    bytes = div(bits, 8)
    for <<chunk::binary-size(bytes) <- bin>>, do: decode1(chunk, type)
  end

  defp decode1(<<x::float-32-native>>, {:f, 32}), do: x
  defp decode1(<<x::float-64-native>>, {:f, 64}), do: x
  defp decode1(<<x::float-16-native>>, {:f, 16}), do: x
  defp decode1(<<x::signed-32-native>>, {:s, 32}), do: x
  defp decode1(<<x::signed-64-native>>, {:s, 64}), do: x
  defp decode1(<<x::unsigned-8>>, {:u, 8}), do: x

  defp decode1(<<h::16-native>>, {:bf, 16}) do
    case <<h::16, 0::16>> do
      <<x::float-32>> -> x
      _ -> special(h, 16, 7)
    end
  end

  defp decode1(chunk, {:f, bits}) do
    <<u::size(bits)-native>> = chunk
    special(u, bits, %{16 => 10, 32 => 23, 64 => 52}[bits])
  end

  defp special(u, bits, mantissa_bits) do
    cond do
      band(u, bsl(1, mantissa_bits) - 1) != 0 -> :nan
      bsr(u, bits - 1) == 1 -> :neg_infinity
      true -> :infinity
    end
  end

  @doc "The value x has once stored as `type` (integers wrap)."
  def quantize(x, type), do: hd(decode(encode1(x, type), type))

  def quantize_all(xs, type), do: decode(encode(xs, type), type)

  @doc "Two's-complement wrap of an exact integer to an integer type."
  def wrap(x, {:u, 8}), do: band(x, 0xFF)

  def wrap(x, {:s, bits}) do
    sign = bsl(1, bits - 1)
    bxor(band(x, bsl(1, bits) - 1), sign) - sign
  end

  # ---- tensors ----------------------------------------------------------------

  @doc """
  Memory statistics of `device` once they settle. On OTP 25 the destructor
  of a tensor a garbage collection found dead runs only once the process is
  scheduled out, so: collect, sync, then yield until the statistics match
  `target` (a bounded number of times, so a real leak still fails the
  caller's comparison). With no target, the statistics after one yield.
  """
  def settled_stats(device, target \\ nil) do
    :erlang.garbage_collect()
    Mambex.sync(device)

    # Yield first (fast), then sleep in 5 ms steps (on a loaded machine the
    # deferred destructors can take longer than 1000 yields), up to ~2 s.
    Enum.reduce_while(1..1400, nil, fn i, _ ->
      if i <= 1000 do
        :erlang.yield()
      else
        :erlang.garbage_collect()
        Process.sleep(5)
      end

      s = Mambex.memory_stats(device)

      if target == nil or
           (s.live_bytes == target.live_bytes and s.live_handles == target.live_handles),
         do: {:halt, s},
         else: {:cont, s}
    end)
    |> stable_baseline(device, target)
  end

  # A baseline (no target) is only trusted once it has stopped moving: the
  # tensors of the previous test can still be dying when it is first read,
  # and a baseline taken half-way never matches the settled state after.
  # Three equal reads 10 ms apart, up to ~2 s.
  defp stable_baseline(s, _device, target) when target != nil, do: s

  defp stable_baseline(s, device, nil) do
    Enum.reduce_while(1..200, {s, 0}, fn _, {prev, same} ->
      :erlang.garbage_collect()
      Process.sleep(10)
      now = Mambex.memory_stats(device)

      cond do
        now.live_bytes != prev.live_bytes or now.live_handles != prev.live_handles ->
          {:cont, {now, 0}}

        same >= 2 ->
          {:halt, {now, same}}

        true ->
          {:cont, {now, same + 1}}
      end
    end)
    |> elem(0)
  end

  @doc """
  Runs `fun` in a process of its own (so every tensor it makes is dead once
  it exits), waits for it to finish normally, and asserts that the device's
  live bytes and handles are back where they were before.
  """
  def assert_no_leak(device, fun, timeout \\ 120_000) do
    before = settled_stats(device)
    {pid, ref} = spawn_monitor(fun)
    assert_receive {:DOWN, ^ref, :process, ^pid, :normal}, timeout
    after_ = settled_stats(device, before)
    assert after_.live_bytes == before.live_bytes
    assert after_.live_handles == before.live_handles
  end

  def numel(shape), do: shape |> Tuple.to_list() |> Enum.reduce(1, &*/2)

  @doc "A tensor holding `values` (already representable in `type`)."
  def make(values, type, shape, device) do
    Tensor.from_binary(encode(values, type), type, shape: shape, device: device)
  end

  @doc "The tensor's elements, decoded by this module (not by the library)."
  def read(%Tensor{type: type} = t), do: decode(Tensor.to_binary(t), type)

  # ---- random inputs (never zero) ---------------------------------------------

  @doc """
  n random values representable in `type`, never zero. Floats: magnitude
  uniform in [lo, hi] (default 0.25..4.0) with a random sign unless
  `positive: true`. Integers: the whole range of the type unless `small: true`
  (then 1..100 in magnitude, with a sign for signed types).
  """
  def rand_values(n, type, opts \\ []) do
    for _ <- 1..n//1, do: rand_value(type, opts)
  end

  def rand_value({:u, 8}, opts) do
    if opts[:small], do: :rand.uniform(100), else: :rand.uniform(255)
  end

  def rand_value({:s, bits}, opts) do
    x =
      if opts[:small],
        do: :rand.uniform(100) * Enum.random([-1, 1]),
        else: :rand.uniform(bsl(1, bits)) - bsl(1, bits - 1) - 1

    if x == 0, do: rand_value({:s, bits}, opts), else: x
  end

  def rand_value(type, opts) do
    lo = Keyword.get(opts, :lo, 0.25)
    hi = Keyword.get(opts, :hi, 4.0)
    sign = if opts[:positive] || :rand.uniform(2) == 1, do: 1, else: -1
    x = quantize(sign * (lo + (hi - lo) * :rand.uniform()), type)
    if x == 0.0, do: rand_value(type, opts), else: x
  end

  @doc "A random tensor and its values."
  def rand_tensor(shape, type, device, opts \\ []) do
    values = rand_values(numel(shape), type, opts)
    {make(values, type, shape, device), values}
  end

  # ---- tolerance checks ---------------------------------------------------------

  def tol({:f, 32}, :elementwise), do: 1.0e-6
  def tol({:f, 32}, :reduction), do: 1.0e-5
  def tol({:f, 64}, _), do: 1.0e-12
  def tol({:bf, 16}, _), do: 1.0e-2
  def tol({:f, 16}, _), do: 1.0e-3

  @doc "||out - ref|| / ||ref|| (absolute when ref is all zeros); :infinity on non-finite output."
  def rel_err(out, ref) do
    if Enum.all?(out, &is_number/1) and Enum.all?(ref, &is_number/1) do
      num =
        Enum.zip_with(out, ref, fn o, r -> (o - r) * (o - r) end) |> Enum.sum() |> :math.sqrt()

      den = ref |> Enum.map(&(&1 * &1)) |> Enum.sum() |> :math.sqrt()
      if den == 0.0, do: num, else: num / den
    else
      :infinity
    end
  end

  @doc "Float types: relative error within the type's tolerance; integer types: equal."
  def assert_matches(out, ref, type, kind \\ :elementwise, label \\ "") do
    assert length(out) == length(ref),
           "#{label}: #{length(out)} elements, expected #{length(ref)}"

    if float?(type) and out != ref do
      err = rel_err(out, ref)
      tol = tol(type, kind)

      assert is_number(err) and err <= tol,
             "#{label} #{inspect(type)}: relative error #{inspect(err)} > #{tol}\n" <>
               "out: #{inspect(Enum.take(out, 8))}\nref: #{inspect(Enum.take(ref, 8))}"
    else
      assert out == ref, "#{label} #{inspect(type)}: results differ"
    end
  end

  # ---- references -----------------------------------------------------------------

  @doc "A binary op on two exact values: f64 for float types, exact then wrapped for integers."
  def ref_binary(op, a, b, type) do
    if float?(type) do
      case op do
        :add -> a + b
        :subtract -> a - b
        :multiply -> a * b
        :divide -> a / b
        :maximum -> max(a, b)
        :minimum -> min(a, b)
      end
    else
      r =
        case op do
          :add -> a + b
          :subtract -> a - b
          :multiply -> a * b
          :divide -> if b == 0, do: 0, else: div(a, b)
          :maximum -> max(a, b)
          :minimum -> min(a, b)
        end

      wrap(r, type)
    end
  end

  def ref_unary(:negate, x, type), do: if(float?(type), do: -x, else: wrap(-x, type))
  def ref_unary(:exp, x, _type), do: :math.exp(x)
  def ref_unary(:log, x, _type), do: :math.log(x)
  def ref_unary(:sqrt, x, _type), do: :math.sqrt(x)

  @doc """
  Reference of a reduction of `values` (shape `shape`) over `axis` (nil: all),
  returning {values, shape}.
  """
  def ref_reduce(op, values, shape, axis, type) do
    dims = Tuple.to_list(shape)
    rank = length(dims)

    {outer, dim, inner, out_shape} =
      case axis do
        nil ->
          {1, numel(shape), 1, {}}

        a ->
          a = if a < 0, do: a + rank, else: a

          {Enum.reduce(Enum.take(dims, a), 1, &*/2), Enum.at(dims, a),
           Enum.reduce(Enum.drop(dims, a + 1), 1, &*/2),
           dims |> List.delete_at(a) |> List.to_tuple()}
      end

    x = List.to_tuple(values)

    out =
      for o <- 0..(outer - 1)//1, i <- 0..(inner - 1)//1 do
        group = for k <- 0..(dim - 1)//1, do: elem(x, o * dim * inner + k * inner + i)
        reduce_group(op, group, type)
      end

    {out, out_shape}
  end

  defp reduce_group(:sum, group, type) do
    s = Enum.sum(group)
    if float?(type), do: s * 1.0, else: wrap(s, type)
  end

  defp reduce_group(:mean, group, _type), do: Enum.sum(group) / length(group)
  defp reduce_group(:max, group, _type), do: Enum.max(group)

  @doc "Strides of a row-major shape."
  def strides(shape) do
    dims = Tuple.to_list(shape)

    {strides, _} = List.foldr(dims, {[], 1}, fn d, {acc, s} -> {[s | acc], s * d} end)

    strides
  end

  @doc "The multi-index of flat index i in shape."
  def unravel(i, shape) do
    shape
    |> strides()
    |> Enum.zip(Tuple.to_list(shape))
    |> Enum.map(fn {s, d} -> rem(div(i, s), d) end)
  end

  @doc "Reference slice: entries start..start+len-1 along axis."
  def ref_slice(values, shape, axis, start, len) do
    rank = tuple_size(shape)
    axis = if axis < 0, do: axis + rank, else: axis
    x = List.to_tuple(values)
    st = strides(shape)
    out_shape = put_elem(shape, axis, len)

    out =
      for i <- 0..(numel(out_shape) - 1)//1 do
        idx = unravel(i, out_shape) |> List.update_at(axis, &(&1 + start))
        elem(x, idx |> Enum.zip(st) |> Enum.map(fn {a, b} -> a * b end) |> Enum.sum())
      end

    {out, out_shape}
  end

  @doc "Reference concatenation of [{values, shape}] along axis."
  def ref_concatenate(parts, axis) do
    {_, shape0} = hd(parts)
    rank = tuple_size(shape0)
    axis = if axis < 0, do: axis + rank, else: axis
    total = parts |> Enum.map(fn {_, s} -> elem(s, axis) end) |> Enum.sum()
    out_shape = put_elem(shape0, axis, total)
    # offsets along the axis of each part
    {offsets, _} = Enum.map_reduce(parts, 0, fn {_, s}, off -> {off, off + elem(s, axis)} end)

    tables =
      Enum.zip_with(parts, offsets, fn {v, s}, off -> {List.to_tuple(v), s, strides(s), off} end)

    out =
      for i <- 0..(numel(out_shape) - 1)//1 do
        idx = unravel(i, out_shape)
        k = Enum.at(idx, axis)

        {x, _s, st, off} =
          Enum.find(tables, fn {_, s, _, off} -> k >= off and k < off + elem(s, axis) end)

        local = List.replace_at(idx, axis, k - off)
        elem(x, local |> Enum.zip(st) |> Enum.map(fn {a, b} -> a * b end) |> Enum.sum())
      end

    {out, out_shape}
  end

  @doc "Reference transpose: output axis k is input axis perm[k]."
  def ref_transpose(values, shape, perm) do
    perm = if is_tuple(perm), do: Tuple.to_list(perm), else: perm
    x = List.to_tuple(values)
    st = strides(shape)
    out_shape = perm |> Enum.map(&elem(shape, &1)) |> List.to_tuple()

    out =
      for i <- 0..(numel(out_shape) - 1)//1 do
        idx = unravel(i, out_shape)
        # input index along axis perm[k] is idx[k]
        off = Enum.zip(perm, idx) |> Enum.map(fn {p, v} -> v * Enum.at(st, p) end) |> Enum.sum()
        elem(x, off)
      end

    {out, out_shape}
  end

  @doc "All permutations of a list."
  def permutations([]), do: [[]]
  def permutations(list), do: for(x <- list, rest <- permutations(list -- [x]), do: [x | rest])

  # ---- the generator of random_uniform / random_normal, by hand ---------------------

  @mask64 0xFFFFFFFFFFFFFFFF
  @golden 0x9E3779B97F4A7C15

  defp mix64(x) do
    x = band(bxor(x, bsr(x, 30)) * 0xBF58476D1CE4E5B9, @mask64)
    x = band(bxor(x, bsr(x, 27)) * 0x94D049BB133111EB, @mask64)
    bxor(x, bsr(x, 31))
  end

  @doc "The k-th uniform double in [0, 1) of stream `seed` (splitmix64-based, 53 bits)."
  def rand_unit(seed, k) do
    w = mix64(band(mix64(bxor(seed, @golden)) + band(k * @golden, @mask64), @mask64))
    bsr(w, 11) * (1.0 / 9_007_199_254_740_992.0)
  end

  # ---- misc ---------------------------------------------------------------------------

  @doc "Runs fun; returns nil when it raises ArgumentError, else a description of what happened."
  def arg_error_outcome(fun) do
    try do
      {:returned, fun.()}
    rescue
      _e in ArgumentError -> nil
      e -> {:raised, e.__struct__, Exception.message(e)}
    catch
      kind, value -> {:caught, kind, value}
    end
  end
end
